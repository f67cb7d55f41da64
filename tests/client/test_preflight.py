"""fedcl-client's pre-flight: before it joins, each check prints one line; a failed check stops the
site with that one line (exit status 2) instead of letting every round fail later.

The failing cases run ``main`` as a user would. Their arguments also carry --no-rejoin and
--max-retries 0, so that code without a pre-flight (which goes on to start a SuperNode) ends
quickly with the SuperNode's own status, and the test fails on it instead of hanging."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from fedcl.client.cli import _parser, main, run_preflight
from fedcl.client.preflight import RUNTIME_PORTS, pick_runtime_port, port_is_free

TOKEN = "the-right-token-of-site-a"


@pytest.fixture
def queue_service():
    """A queue service on loopback that knows site-a's token; its address."""
    from fedcl.queue import EmbeddingQueue
    from fedcl.server.queue_service import ServeSettings, start_queue_server

    queue = EmbeddingQueue(dim=8, capacity=64, per_site_quota=32, max_staleness=2, dtype="float32")
    server = start_queue_server(queue, ServeSettings(coordinator_token="the-coordinator-token",
                                                     site_tokens={"site-a": TOKEN}))
    yield f"127.0.0.1:{server.port}"
    server.stop(0)


@pytest.fixture
def site_data(tmp_path):
    path = tmp_path / "site-a.npz"
    np.savez(path, train_images=np.zeros((12, 28, 28), np.uint8), train_labels=np.zeros(12, np.int64))
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(tmp_path, data, *extra: str) -> list[str]:
    return ["--server", f"127.0.0.1:{_closed_port()}", "--site-id", "site-a", "--data", str(data),
            "--state-dir", str(tmp_path / "state"), "--insecure", "--no-rejoin", "--max-retries", "0", *extra]


def _stops_with_one_line(capsys, argv: list[str], check: str) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"expected the pre-flight to stop the site (exit 2); got {code}\n{out}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fedcl-client: error: check {check}: "), err
    assert "Traceback" not in out + err and "Starting Flower SuperNode" not in out + err
    return lines[0]


def test_every_check_says_ok_in_one_line(tmp_path, capsys, queue_service, site_data):
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nrequire_dpsgd = true\nepsilon_budget = 8.0\n")
    args = _parser().parse_args(_args(tmp_path, site_data, "--queue-address", queue_service, "--token", TOKEN,
                                      "--policy", str(policy)))
    argv, port = run_preflight(args, TOKEN)
    lines = capsys.readouterr().out.splitlines()
    for check, found in (("state folder", "is writable"), ("policy", "requires DP-SGD; release modes"),
                         ("data", "12 images of 1x28x28 (medmnist)"), ("node key", "none given"),
                         ("queue token", "accepted site 'site-a'"),
                         ("runtime port", f"127.0.0.1:{port} (derived from the site id")):
        mine = [line for line in lines if line.startswith(f"fedcl-client: check {check}: ok: ")]
        assert len(mine) == 1 and found in mine[0], (check, lines)
    assert "fedcl-client: check CA: not checked: --insecure, no TLS anywhere (loopback tests only)" in lines
    assert argv[argv.index("--port") + 1] == str(port) and port in RUNTIME_PORTS


@pytest.mark.parametrize("token", ["a-wrong-token", None])
def test_a_wrong_or_missing_queue_token_stops_the_site_at_start(tmp_path, capsys, queue_service, site_data,
                                                                monkeypatch, token):
    monkeypatch.delenv("FEDCL_QUEUE_TOKEN", raising=False)
    extra = ("--token", token) if token else ()
    line = _stops_with_one_line(capsys, _args(tmp_path, site_data, "--queue-address", queue_service, *extra),
                                "queue token")
    assert f"the queue service at {queue_service} refused site 'site-a'" in line
    assert "UNAUTHENTICATED" in line and "--token-file" in line


def test_a_queue_service_that_does_not_answer_is_said_not_a_failure(tmp_path, capsys, site_data):
    args = _parser().parse_args(_args(tmp_path, site_data, "--queue-address", f"127.0.0.1:{_closed_port()}",
                                      "--token", TOKEN))
    run_preflight(args, TOKEN)
    out = capsys.readouterr().out
    assert "check queue token: not checked: no queue service answered at 127.0.0.1:" in out


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: d.mkdir() or d, "no image files"),
        (
            lambda d: (
                np.savez(d.with_suffix(".npz"), train_images=np.zeros((0, 28, 28), np.uint8),
                         train_labels=np.zeros(0, np.int64))
                or d.with_suffix(".npz")
            ),
            "holds no training images",
        ),
        (lambda d: d.with_suffix(".txt").write_text("notes") and d.with_suffix(".txt"),
         "neither a .npz file nor"),
    ],
)
def test_unusable_data_stops_the_site_at_start(tmp_path, capsys, make, problem):
    data = make(tmp_path / "images")
    assert data.exists()  # a path that exists: fedcl-client used to accept it and fail at every round
    line = _stops_with_one_line(capsys, _args(tmp_path, data), "data")
    assert problem in line


def test_a_bad_policy_stops_the_site_at_start(tmp_path, capsys, site_data):
    policy = tmp_path / "policy.toml"
    policy.write_text("[policy]\nrequire_dpsgd = true\nepsilon_budgett = 8.0\n")
    line = _stops_with_one_line(capsys, _args(tmp_path, site_data, "--policy", str(policy)), "policy")
    assert "epsilon_budgett" in line


def test_an_unwritable_state_folder_stops_the_site_at_start(tmp_path, capsys, site_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder inside a file cannot be made, even by root
    argv = _args(tmp_path, site_data)
    argv[argv.index("--state-dir") + 1] = str(blocker / "state")
    line = _stops_with_one_line(capsys, argv, "state folder")
    assert "give --state-dir a writable folder" in line


def test_a_bad_node_key_stops_the_site_at_start(tmp_path, capsys, site_data):
    ca, key = tmp_path / "ca.pem", tmp_path / "site-a.node-key"
    ca.write_text("not used: the node key is checked first")
    key.write_text("-----BEGIN CERTIFICATE-----\n")
    argv = [a for a in _args(tmp_path, site_data, "--root-certificates", str(ca), "--node-key", str(key))
            if a != "--insecure"]
    line = _stops_with_one_line(capsys, argv, "node key")
    assert "not an unencrypted OpenSSH private key" in line


def test_a_runtime_port_given_and_taken_stops_the_site_at_start(tmp_path, capsys, site_data):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = _stops_with_one_line(
            capsys, _args(tmp_path, site_data, "--runtime-address", f"127.0.0.1:{port}"), "runtime port"
        )
    assert f"127.0.0.1:{port} (--runtime-address) is in use" in line


def test_runtime_ports_come_from_the_site_id_and_skip_taken_ones():
    a, _ = pick_runtime_port("127.0.0.1", None, site_id="hospital-a")
    assert pick_runtime_port("127.0.0.1", None, site_id="hospital-a")[0] == a  # the same after a restart
    assert pick_runtime_port("127.0.0.1", None, site_id="hospital-b")[0] != a
    if not port_is_free("127.0.0.1", a):
        pytest.skip(f"port {a} is in use on this machine")
    with socket.create_server(("127.0.0.1", a)):
        other, how = pick_runtime_port("127.0.0.1", None, site_id="hospital-a")
    assert other != a and other in RUNTIME_PORTS and "next free one" in how
