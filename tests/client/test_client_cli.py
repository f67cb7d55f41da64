"""fedcl-client's mapping onto Flower's SuperNode: node config that Flower parses back exactly."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedcl.client.cli import (
    ClientCliError,
    _parser,
    _store_token,
    build_supernode_argv,
    check_server_certificate,
    supervise,
)


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


def test_patient_regex_reaches_the_site_as_written(tmp_path):
    pattern = r"^(P\d+)_[a-z]{2,}"  # backslashes and braces survive Flower's node-config parser
    args = _parser().parse_args(_argv(tmp_path, "--insecure", "--patient-regex", pattern))
    argv = build_supernode_argv(args, token_file=None)
    assert parse_config_args([argv[argv.index("--node-config") + 1]])["patient-regex"] == pattern
    args = _parser().parse_args(_argv(tmp_path, "--insecure", "--patient-regex", "^(P"))
    with pytest.raises(ClientCliError, match="--patient-regex .* not a valid regular expression"):
        build_supernode_argv(args, token_file=None)


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
    # the supervisor is stopped (SIGTERM) once the child has run a third time: an event, not a guess of
    # how long three interpreter starts take on a busy machine
    supervisor = (
        "import os, pathlib, signal, sys, threading, time\n"
        "from fedcl.client.cli import supervise\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "def third_run():\n"
        "    while not (p.exists() and p.read_text().strip().isdigit() and int(p.read_text()) >= 3):\n"
        "        time.sleep(0.05)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "threading.Thread(target=third_run, daemon=True).start()\n"
        f"sys.exit(supervise([sys.executable, '-c', {script!r}], rejoin=True, min_delay=0.1))\n")
    try:
        proc = subprocess.run([sys.executable, "-c", supervisor], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(
            f"awaited the supervised child's third run and the supervisor's exit on SIGTERM; "
            f"runs so far: {counter.read_text() if counter.exists() else 0}; "
            f"stdout: {err.stdout!r}") from None
    assert proc.returncode == 0, proc.stderr
    assert int(counter.read_text()) >= 3  # exited with 0 and then 7, and was started again each time
    assert "rejoining" in proc.stdout


# ------------------------------------------------------------- SuperNode key, the server's certificate

REPO = Path(__file__).resolve().parents[2]


def _certs(out: Path, *sites: str, server_name: str | None = "localhost") -> Path:
    names = ["--server-name", server_name] if server_name else []
    subprocess.run(
        [sys.executable, str(REPO / "deploy" / "make_certs.py"), "--out", str(out), "--server-ip",
         "127.0.0.1", *names, *[a for s in sites for a in ("--site", s)]],
        check=True, capture_output=True,
    )
    return out


def test_node_key_goes_to_flower_and_bad_keys_are_explained(tmp_path):
    certs = _certs(tmp_path / "certs", "hospital-a")
    key = certs / "sites" / "hospital-a.node-key"
    args = _parser().parse_args(
        _argv(tmp_path, "--root-certificates", str(certs / "ca.pem"), "--node-key", str(key)))
    argv = build_supernode_argv(args, token_file=None)
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    for bad, message in (
        (certs / "sites" / "hospital-a.node-key.pub", "not an unencrypted OpenSSH private key"),
        (certs / "sites" / "hospital-a.key", "not an unencrypted OpenSSH private key"),
        (tmp_path / "missing", "No such file"),
    ):
        args.node_key = bad
        with pytest.raises(ClientCliError, match=message):
            build_supernode_argv(args, token_file=None)
    insecure = _parser().parse_args(_argv(tmp_path, "--insecure", "--node-key", str(key)))
    with pytest.raises(ClientCliError, match="needs TLS"):
        build_supernode_argv(insecure, token_file=None)


@pytest.fixture
def tls_server(tmp_path):
    """A TLS listener on 127.0.0.1 with make_certs.py's server certificate; (port, certs folder)."""
    import socket
    import ssl
    import threading

    certs = _certs(tmp_path / "consortium", server_name=None)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], certs
    stop.set()
    thread.join(timeout=5)
    listener.close()


def test_server_certificate_is_checked_before_joining(tmp_path, tls_server):
    port, certs = tls_server
    assert check_server_certificate("127.0.0.1", port, certs / "ca.pem") is None
    rogue = _certs(tmp_path / "rogue")  # another CA: it did not sign the server's certificate
    with pytest.raises(ClientCliError, match=r"presented a certificate that .*rogue/ca.pem does not verify"):
        check_server_certificate("127.0.0.1", port, rogue / "ca.pem")
    with pytest.raises(ClientCliError, match="not valid for 'localhost'.*--server-name"):
        check_server_certificate("localhost", port, certs / "ca.pem")  # made for 127.0.0.1 only
    with pytest.raises(ClientCliError, match="not a PEM CA certificate"):
        check_server_certificate("127.0.0.1", port, certs / "tokens.toml")
    with socket.socket() as s:  # nobody listens: not an error yet, the reason comes back
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert "refused" in check_server_certificate("127.0.0.1", closed, certs / "ca.pem").lower()


def test_fedcl_client_with_the_wrong_ca_stops_with_one_clear_message(tmp_path, tls_server):
    port, _ = tls_server
    rogue = _certs(tmp_path / "rogue")
    proc = subprocess.run(
        [sys.executable, "-m", "fedcl.client.cli", "--server", f"127.0.0.1:{port}", "--data-format",
         "synthetic", "--site-id", "hospital-a", "--state-dir", str(tmp_path / "state"),
         "--root-certificates", str(rogue / "ca.pem")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("fedcl-client: error: check CA: the server at 127.0.0.1:")
    assert "does not verify" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert "Traceback" not in proc.stderr and "Starting Flower SuperNode" not in proc.stdout + proc.stderr


def _supervise_refused_child(child: str, *, timeout: float) -> subprocess.CompletedProcess:
    """fedcl-client's supervisor, without rejoining and with the refused-key hint, over a child that runs
    the Python code ``child``, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-c",
         "import sys; from fedcl.client.cli import supervise, NODE_REFUSED, NODE_REFUSED_HINT;"
         f"sys.exit(supervise([sys.executable, '-c', {child!r}], rejoin=False,"
         " output_hints={NODE_REFUSED: NODE_REFUSED_HINT}))"],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


def test_supervisor_explains_a_refused_supernode(tmp_path):
    # what flower-supernode prints (and its status) when the SuperLink does not know its key
    child = "print('[code: 2004] Failed to activate SuperNode.'); import sys; sys.exit(1)"
    proc = _supervise_refused_child(child, timeout=60)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0] == "[code: 2004] Failed to activate SuperNode."  # Flower's own line, passed on
    assert lines[1].startswith("fedcl-client: the SuperLink does not know this SuperNode's key (yet)")
    # not "your key is wrong": it may be registered later
    assert "joins once the key is registered" in lines[1]


def test_supervisor_restarts_a_refused_supernode_whose_children_linger(tmp_path):
    """flower-supernode leaves its SuperExec running (holding the output pipe) when it exits: the
    supervisor must notice the exit itself, not wait for the end of the output."""
    linger = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])")
    child = f"{linger}; print('[code: 2004] Failed to activate SuperNode.'); sys.exit(1)"
    t0 = time.monotonic()
    proc = _supervise_refused_child(child, timeout=200)
    assert proc.returncode == 1 and time.monotonic() - t0 < 100  # well below the lingering child's 120 s
    assert "does not know this SuperNode's key" in proc.stdout


def test_supervisor_stops_on_a_permanent_local_error(tmp_path):
    """A real flower-supernode whose runtime port another process holds fails to start; restarting it
    cannot help, so the supervisor stops with one line (status 2) instead of retrying forever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        supernode = [str(Path(sys.executable).parent / "flower-supernode"), "--insecure", "--superlink",
                     f"127.0.0.1:{closed}", "--port", str(port), "--max-retries", "0"]
        supervisor = (
            "import sys; from fedcl.client.cli import supervise, permanent_errors;"
            f"sys.exit(supervise({supernode!r}, rejoin=True, min_delay=0.1, fatal_output=permanent_errors("
            f"runtime_address='127.0.0.1:{port}', health_address=None)))")
        env = {**os.environ, "HOME": str(tmp_path), "FLWR_TELEMETRY_ENABLED": "0",
               "FLWR_DISABLE_UPDATE_CHECK": "1"}
        env.pop("FLWR_HOME", None)
        try:
            proc = subprocess.run([sys.executable, "-c", supervisor], capture_output=True, text=True,
                                  timeout=300, cwd=REPO, env=env)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(
                f"awaited the supervisor's exit after the SuperNode failed to bind {port}; it kept "
                f"going: {err.stdout!r}") from None
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Runtime HTTP API failed to start" in proc.stdout  # Flower's own words, passed on
    assert "rejoining" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"fedcl-client: error: the SuperNode could not serve its runtime API at 127.0.0.1:{port}")


def test_supervisor_stops_when_the_supernode_cannot_be_started():
    """A SuperNode command that is not installed (or not on PATH) is not restarted forever: one line,
    status 2."""
    code = ("from fedcl.client.cli import supervise; "
            "raise SystemExit(supervise(['fedcl-no-such-supernode'], rejoin=True))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "fedcl: cannot start 'fedcl-no-such-supernode': No such file or directory",
        "fedcl-client: error: fedcl-no-such-supernode could not be started (the line above says why): "
        "install Flower (flwr) in this Python environment, or put its bin folder on PATH"]
    assert "rejoining" not in proc.stdout
