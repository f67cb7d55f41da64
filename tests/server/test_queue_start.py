"""The queue service's start paths and limits, through the real commands as subprocesses.

``fedcl-server queue`` (a [queue_service] file), ``fedcl-server serve-queue`` and ``fedcl-server
run`` (a consortium config) go through one start function: the same refusals, one line each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedcl.queue import EmbeddingQueue
from fedcl.wire.proto import queue_pb2, queue_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
COORD = "coordinator-token-0123456789abcdef"
TOKENS = {"site-a": "token-of-site-a-0123456789", "site-b": "token-of-site-b-0123456789"}
START_TIMEOUT = 120  # seconds for a command to start or refuse; generous: the machine may be loaded
ENV = dict(os.environ, PYTHONPATH=str(REPO), FLWR_TELEMETRY_ENABLED="0", GRPC_VERBOSITY="ERROR")
# Every test here starts real processes (a few seconds each on 2 cores). The default tier keeps one
# command per refusal (``fedcl-server queue``); the same refusal through the other commands, the
# demo-switch restarts (in process: test_queue_service's demo_open_queue test) and the kill drill
# (in process: test_rounds' rows-lost test) run in the e2e tier.
ALL_COMMANDS = ["queue", pytest.param("serve-queue", marks=pytest.mark.e2e),
                pytest.param("run", marks=pytest.mark.e2e)]


def _toml_table(name: str, values: dict) -> str:
    lines = [f"[{name}]"]
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    return "\n".join(lines) + "\n"


def queue_toml(tmp_path: Path, *, tokens: dict[str, str] | None = None, **settings) -> Path:
    """A [queue_service] file for ``fedcl-server queue``."""
    values = {"host": "127.0.0.1", "port": 0, "insecure": True, "coordinator_token": COORD,
              "snapshot_path": str(tmp_path / "queue-snapshot.npz"),
              "audit_log": str(tmp_path / "audit.jsonl")}
    values.update(settings)
    path = tmp_path / "queue.toml"
    path.write_text(_toml_table("queue_service", values)
                    + _toml_table("queue_service.site_tokens", TOKENS if tokens is None else tokens))
    return path


def consortium_toml(tmp_path: Path, *, tokens: dict[str, str] | None = None, certs: Path | None = None,
                    proj_dim: int = 64, **server) -> Path:
    """A consortium config for ``fedcl-server serve-queue`` and ``fedcl-server run``."""
    values = {"queue_host": "127.0.0.1", "queue_port": 0, "superlink_port": 0,
              "out_dir": str(tmp_path / "out"), "coordinator_token": COORD}
    if certs is None:
        values["insecure"] = True
    else:
        values.update(insecure=False, tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
                      tls_ca=str(certs / "ca.pem"))
    values.update(server)
    path = tmp_path / "consortium.toml"
    path.write_text(_toml_table("model", {"proj_dim": proj_dim}) + _toml_table("server", values)
                    + _toml_table("server.site_tokens", TOKENS if tokens is None else tokens))
    return path


def command(kind: str, tmp_path: Path, **config) -> list[str]:
    """argv of ``kind`` (queue | serve-queue | run) with a config built from ``config``."""
    base = [sys.executable, "-m", "fedcl.server.cli", kind, "--config"]
    if kind == "queue":
        return [*base, str(queue_toml(tmp_path, **config))]
    path = consortium_toml(tmp_path, **config)
    return [*base, str(path)] + (["--listen", "127.0.0.1:0"] if kind == "serve-queue" else [])


def snapshot_path(kind: str, tmp_path: Path) -> Path:
    return tmp_path / "queue-snapshot.npz" if kind == "queue" else tmp_path / "out" / "queue-snapshot.npz"


def refusal(argv: list[str]) -> str:
    """Run a command that must refuse to start; return its one line of stderr."""
    try:
        done = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{argv[3]} did not refuse within {START_TIMEOUT} s: it started serving "
                             f"(stdout: {err.stdout!r})") from None
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


class Running:
    """A command that serves: its port (from its first line), its stderr, stopped with SIGTERM."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        found: dict[str, int] = {}

        def read() -> None:
            for line in self.proc.stdout:
                if (
                    "queue service" in line
                    and (port := line.rsplit(":", 1)[-1].split()[0].rstrip(";")).isdigit()
                ):
                    found["port"] = int(port)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        if "port" not in found:
            self.proc.kill()
            raise AssertionError(f"no 'queue service ... :PORT' line within {START_TIMEOUT} s; "
                                 f"stderr: {self.proc.stderr.read()}")
        self.port = found["port"]

    def stop(self, sig: int = signal.SIGTERM) -> str:
        self.proc.send_signal(sig)
        try:
            _, stderr = self.proc.communicate(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(
                f"the queue service did not stop within {START_TIMEOUT} s of signal {sig}") from None
        return stderr


def stub(port: int) -> tuple[grpc.Channel, queue_pb2_grpc.EmbeddingQueueStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, queue_pb2_grpc.EmbeddingQueueStub(channel)


def auth(token: str | None = None, site: str | None = None) -> list[tuple[str, str]]:
    return ([("authorization", f"Bearer {token}")] if token else []) + (
        [("x-fedcl-site", site)] if site else [])


def push_chunk(rows: int, *, dim: int = 128, seed: int = 0, request_id: str = "") -> queue_pb2.PushChunk:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype("<f4")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return queue_pb2.PushChunk(round=1, model_version=1, rows=rows, dim=dim, dtype=queue_pb2.DTYPE_FLOAT32,
                               data=x.tobytes(), total_rows=rows, request_id=request_id)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(
        [sys.executable, str(REPO / "deploy" / "make_certs.py"), "--out", str(out), "--server-name",
         "localhost", "--server-ip", "127.0.0.1", "--site", "site-a"],
        check=True, capture_output=True, timeout=START_TIMEOUT,
    )
    return out


# ------------------------------------------------ item 1: no open queue by omission


@pytest.mark.parametrize("kind", ["serve-queue", pytest.param("run", marks=pytest.mark.e2e)])
def test_tls_without_site_tokens_is_refused_naming_the_setting(kind, tmp_path, certs):
    line = refusal(command(kind, tmp_path, tokens={}, certs=certs))
    assert "server.site_tokens" in line and "demo_open_queue_no_auth" in line


def test_queue_without_site_tokens_is_refused_naming_the_setting(tmp_path):
    line = refusal(command("queue", tmp_path, tokens={}))
    assert "site_tokens" in line and "demo_open_queue_no_auth" in line


@pytest.mark.e2e
def test_the_demo_switch_warns_at_every_start_and_an_anonymous_caller_is_never_the_coordinator(tmp_path):
    argv = command("serve-queue", tmp_path, tokens={}, demo_open_queue_no_auth=True)
    for _ in range(2):  # every start warns, not only the first
        served = Running(argv)
        channel, queue = stub(served.port)
        with channel:
            for metadata in (auth(), auth(site="coordinator")):  # no token: not the coordinator
                with pytest.raises(grpc.RpcError) as err:
                    queue.Advance(queue_pb2.AdvanceRequest(round=9), metadata=metadata, timeout=30)
                assert err.value.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                            grpc.StatusCode.PERMISSION_DENIED)
            assert queue.Stats(queue_pb2.StatsRequest(), metadata=auth(COORD), timeout=30).current_round == 0
        stderr = served.stop()
        assert "WARNING: DEMO OPEN QUEUE" in stderr, stderr


def test_queue_reads_the_fedcl_config_like_serve_queue(tmp_path):
    """One config format for every queue command: ``fedcl-server queue`` used to refuse the fedcl
    config ("has no [queue_service] table") that serve-queue and run read."""
    served = Running(
        [sys.executable, "-m", "fedcl.server.cli", "queue", "--config", str(consortium_toml(tmp_path)),
         "--listen", "127.0.0.1:0"]
    )
    channel, queue = stub(served.port)
    with channel:
        assert queue.Stats(queue_pb2.StatsRequest(), metadata=auth(COORD), timeout=30).current_round == 0
    served.stop()
    assert snapshot_path("serve-queue", tmp_path).exists()  # serve-queue's snapshot, in server.out_dir


# ------------------------------------------------ item 3: one start path, one behaviour


def _write_snapshot(path: Path, *, dim: int) -> None:
    queue = EmbeddingQueue(dim=dim, capacity=65536, per_site_quota=16384, max_staleness=0, dtype="float16")
    path.parent.mkdir(parents=True, exist_ok=True)
    queue.snapshot(path)


@pytest.mark.parametrize("kind", ALL_COMMANDS)
def test_a_corrupt_snapshot_is_one_line_in_every_command(kind, tmp_path):
    argv = command(kind, tmp_path,
                   **({"dim": 64, "capacity": 65536, "per_site_quota": 16384, "max_staleness": 0}
                      if kind == "queue" else {}))
    snapshot = snapshot_path(kind, tmp_path)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.write_bytes(b"PK\x03\x04 not a snapshot")
    line = refusal(argv)
    assert str(snapshot) in line and "not usable" in line and "delete it" in line


@pytest.mark.parametrize("kind", ALL_COMMANDS)
def test_a_snapshot_of_another_dim_is_refused_by_every_command(kind, tmp_path):
    argv = command(kind, tmp_path,
                   **({"dim": 64, "capacity": 65536, "per_site_quota": 16384, "max_staleness": 0}
                      if kind == "queue" else {"proj_dim": 64}))
    _write_snapshot(snapshot_path(kind, tmp_path), dim=128)
    line = refusal(argv)
    assert "dim = 128" in line and "64" in line and "move the snapshot away" in line


@pytest.mark.parametrize("kind", ALL_COMMANDS)
def test_short_and_duplicated_tokens_are_refused_by_every_command(kind, tmp_path):
    table = "site_tokens" if kind == "queue" else "server.site_tokens"
    line = refusal(command(kind, tmp_path, tokens={"site-a": "x", "site-b": TOKENS["site-b"]}))
    assert f"{table}.site-a is shorter than 16 characters" in line
    line = refusal(command(kind, tmp_path, tokens={"site-a": TOKENS["site-a"], "site-b": TOKENS["site-a"]}))
    assert f"{table}.site-a and {table}.site-b have the same token" in line


# ------------------------------------------------ item 2: one site cannot stall the service


def test_a_site_stalling_more_streams_than_threads_cannot_stall_the_coordinator(tmp_path):
    workers, streams, idle = 8, 20, 4.0
    served = Running(command("queue", tmp_path, max_workers=workers, coordinator_reserve=2, per_site_calls=4,
                             stream_idle_timeout=idle, dim=128))
    release = threading.Event()

    def stalled(i: int):
        yield push_chunk(2, seed=i, request_id=f"stall-{i}")  # one chunk, then silence
        release.wait(START_TIMEOUT)

    channel, queue = stub(served.port)
    try:
        calls = [
            queue.Push.future(stalled(i), metadata=auth(TOKENS["site-a"], "site-a"), timeout=START_TIMEOUT)
            for i in range(streams)]
        # the streams beyond the per-site limit are refused at once, whatever the machine's load
        deadline = time.monotonic() + START_TIMEOUT
        while sum(c.done() for c in calls) < streams - 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = [c for c in calls if c.done()]
        assert len(refused) == streams - 4, f"awaited {streams - 4} refused streams, got {len(refused)}"
        assert all(c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for c in refused)
        assert "per-site limit" in refused[0].details()
        # 4 of site-a's streams are still held, yet the coordinator is answered within a second
        for _ in range(3):
            start = time.monotonic()
            queue.Stats(queue_pb2.StatsRequest(), metadata=auth(COORD), timeout=1.0)
            reply = queue.Advance(queue_pb2.AdvanceRequest(round=1), metadata=auth(COORD), timeout=1.0)
            assert time.monotonic() - start < 1.0 and reply.current_round == 1
        # another site is not affected either
        assert queue.Push(iter([push_chunk(3, seed=99)]), metadata=auth(TOKENS["site-b"], "site-b"),
                          timeout=30).accepted == 3
        # the held streams are cut by the server once idle, not by this client's deadline
        held = [c for c in calls if not c.done()]
        assert len(held) == 4
        for c in held:
            try:
                c.result(timeout=START_TIMEOUT)
            except grpc.FutureTimeoutError:
                raise AssertionError(f"awaited the server cutting an idle stream after {idle} s") from None
            except grpc.RpcError:
                pass
            assert c.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
        stats = queue.Stats(queue_pb2.StatsRequest(), metadata=auth(COORD), timeout=30)
        assert dict(stats.per_site) == {"site-b": 3}  # nothing of the stalled pushes was stored
    finally:
        release.set()
        channel.close()
        served.stop()
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    cuts = [e for e in audit if e["event"] == "rejection" and e.get("code") == "DEADLINE_EXCEEDED"]
    assert cuts and "stream_idle_timeout" in cuts[0]["reason"]


# ------------------------------------------------ item 4: acknowledged pushes lost at a kill -9 are counted


@pytest.mark.e2e
def test_rows_acknowledged_after_the_last_snapshot_are_reported_lost_after_a_kill(tmp_path):
    argv = command("queue", tmp_path, dim=128)
    served = Running(argv)
    channel, queue = stub(served.port)
    with channel:
        queue.Advance(queue_pb2.AdvanceRequest(round=1), metadata=auth(COORD), timeout=30)  # snapshot
        assert (
            queue.Push(iter([push_chunk(5)]), metadata=auth(TOKENS["site-a"], "site-a"), timeout=30).accepted
            == 5)
    served.stop(signal.SIGKILL)
    served = Running(argv)
    channel, queue = stub(served.port)
    with channel:
        stats = queue.Stats(queue_pb2.StatsRequest(), metadata=auth(COORD), timeout=30)
        assert (stats.restarts, stats.rows_lost, stats.size) == (1, 5, 0)
        assert (
            queue.Push(iter([push_chunk(2)]), metadata=auth(TOKENS["site-a"], "site-a"), timeout=30).accepted
            == 2)
    served.stop()  # a clean stop snapshots: nothing more is lost
    served = Running(argv)
    channel, queue = stub(served.port)
    with channel:
        stats = queue.Stats(queue_pb2.StatsRequest(), metadata=auth(COORD), timeout=30)
        assert (stats.restarts, stats.rows_lost, stats.size) == (2, 5, 2)
    served.stop()
