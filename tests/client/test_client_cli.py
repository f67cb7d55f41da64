"""fedcl-client's mapping onto Flower's SuperNode: node config that Flower parses back exactly."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest
from flwr.common.config import parse_config_args

from client.cli import ClientCliError, _parser, _store_token, build_supernode_argv, supervise


def _argv(tmp_path, *extra: str) -> list[str]:
    data = tmp_path / "site data.npz"  # a space: the node config must quote it
    data.write_bytes(b"")
    return ["--server", "coordinator.example.org", "--data", str(data), "--site-id", "hospital-a",
            "--state-dir", str(tmp_path / "state"), *extra]


def test_node_config_round_trips_through_flowers_parser(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    args = _parser().parse_args(_argv(tmp_path, "--root-certificates", str(ca), "--partition-id", "1",
                                      "--num-partitions", "3", "--threads", "2"))
    token = tmp_path / "tok"
    argv = build_supernode_argv(args, token_file=token)
    assert argv[:3] == ["flower-supernode", "--superlink", "coordinator.example.org:8000"]
    assert argv[argv.index("--root-certificates") + 1] == str(ca.resolve()) and "--insecure" not in argv
    node = parse_config_args([argv[argv.index("--node-config") + 1]])
    assert node == {
        "site-id": "hospital-a", "data-format": "auto", "insecure": False,
        "data-path": str((tmp_path / "site data.npz").resolve()), "partition-id": 1, "num-partitions": 3,
        "threads": 2, "queue-token-file": str(token.resolve()), "root-certificates": str(ca.resolve()),
        "state-dir": str((tmp_path / "state").resolve()),
    }
    assert "--token" not in " ".join(argv)  # tokens never on a command line


@pytest.mark.parametrize(("extra", "message"), [
    ((), "root-certificates"),  # TLS is the default
    (("--insecure", "--partition-id", "1"), "num-partitions"),
    (("--insecure", "--site-id", "bad id"), "site-id"),
    (("--insecure", "--server", "host:notaport"), "HOST"),
])
def test_user_mistakes_are_explained(tmp_path, extra, message):
    args = _parser().parse_args(_argv(tmp_path, *extra))
    with pytest.raises(ClientCliError, match=message):
        build_supernode_argv(args, token_file=None)


def test_missing_data_and_quotes_in_paths(tmp_path):
    args = _parser().parse_args(_argv(tmp_path, "--insecure"))
    args.data = tmp_path / "nowhere"
    with pytest.raises(ClientCliError, match="does not exist"):
        build_supernode_argv(args, token_file=None)
    odd = tmp_path / "it's.npz"
    odd.write_bytes(b"")
    args.data = odd
    with pytest.raises(ClientCliError, match="single quote"):
        build_supernode_argv(args, token_file=None)


def test_token_is_stored_private(tmp_path):
    path = _store_token("secret-token\n", tmp_path / "state")
    assert path.read_text() == "secret-token\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_supervisor_restarts_a_supernode_that_drops_out(tmp_path):
    counter = tmp_path / "runs"
    script = (f"import pathlib, sys; p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) + 1 "
              f"if p.exists() else 1; p.write_text(str(n)); sys.exit(0 if n < 3 else 7)")
    # rejoin=False returns the child's status at once; with rejoin the child is started again
    assert supervise([sys.executable, "-c", script], rejoin=False) == 0
    assert counter.read_text() == "1"
    proc = subprocess.run([sys.executable, "-c", (
        "import sys; from client.cli import supervise; import threading, os, signal;"
        f"threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start();"
        f"sys.exit(supervise([sys.executable, '-c', {script!r}], rejoin=True, min_delay=0.1))")],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert int(counter.read_text()) >= 3  # exited with 0 and then 7, and was started again each time
    assert "rejoining" in proc.stdout
