"""fedcl-server's pieces that need no running federation: the app folder, SuperLink flags, health."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.cli.config_utils import load_and_validate

from fedcl.config import ConfigError, load_config
from fedcl.server.cli import (
    ServerCliError,
    _resolve_paths,
    check_supernode_keys,
    main,
    register_supernode_keys,
    superlink_command,
    write_app_dir,
    write_effective_config,
)

REPO = Path(__file__).resolve().parents[2]


def test_app_folder_is_a_valid_flower_app_pointing_at_the_installed_components(tmp_path):
    app_dir = write_app_dir(tmp_path / "app")
    config, _warnings = load_and_validate(app_dir / "pyproject.toml")
    assert config["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedcl.server.app:app",
                                                           "clientapp": "fedcl.client.app:app"}
    assert set(config["tool"]["flwr"]["app"]["config"]) == {"config-path",
                                                            "out-dir"}  # what fedcl-server sets
    assert [p.name for p in app_dir.iterdir()] == ["pyproject.toml"]  # no code travels to the sites


def test_superlink_flags_follow_the_tls_settings(tmp_path):
    insecure = load_config(None, ["server.insecure=true"])
    assert "--insecure" in superlink_command(insecure, port=9000)
    tls = load_config(None, [f'server.tls_cert="{tmp_path}/s.pem"', f'server.tls_key="{tmp_path}/s.key"',
                             f'server.tls_ca="{tmp_path}/ca.pem"'])
    cmd = superlink_command(tls, port=9000, health_address="127.0.0.1:9001")
    assert cmd[cmd.index("--ssl-certfile") + 1] == f"{tmp_path}/s.pem" and "--insecure" not in cmd
    assert cmd[cmd.index("--health-server-address") + 1] == "127.0.0.1:9001"
    assert "--disable-runtime-dependency-installation" in cmd  # sites and server run the installed fedcl
    with pytest.raises(ServerCliError, match="tls_cert"):
        superlink_command(load_config(None, []), port=9000)


def test_effective_config_is_private_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _resolve_paths(load_config(None, ['server.out_dir="rel/out"', 'server.site_tokens={a="x"}']),
                         out_dir=None)
    assert cfg.server.out_dir == tmp_path / "rel" / "out"
    path = write_effective_config(cfg, cfg.server.out_dir)
    assert path.stat().st_mode & 0o077 == 0  # it holds the queue tokens
    assert json.loads(path.read_text())["server"]["site_tokens"] == {"a": "x"}


def test_the_template_keeps_one_audit_log_per_run_folder(tmp_path, monkeypatch):
    """deploy/consortium.toml used to fix server.audit_log, so every run appended to one file."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "deploy" / "consortium.toml", [
        "server.coordinator_token='coordinator-token-0123456789'",
        "server.site_tokens={hospital-a='token-a-0123456789abc', hospital-b='token-b-0123456789abc'}"])
    logs = [_resolve_paths(cfg, out_dir=Path(run)).server.audit_log for run in ("runs/one", "runs/two")]
    assert logs == [tmp_path / "runs" / run / "queue-audit.jsonl" for run in ("one", "two")]


def test_health_and_config_errors_exit_non_zero(tmp_path, capsys):
    assert main(["health", "--grpc", "127.0.0.1:1", "--timeout", "0.5"]) == 1
    assert main(["health", "--http", "http://127.0.0.1:1/health", "--timeout", "0.5"]) == 1
    assert main(["start-run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture
def http_health():
    """A /health endpoint on loopback answering with the status code the test puts in ``status[0]``."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    status = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(status[0])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health", status
    server.shutdown()
    server.server_close()


def test_health_prints_its_status_line_when_healthy_and_when_not(http_health, capsys):
    url, status = http_health
    assert main(["health", "--http", url]) == 0
    out = capsys.readouterr()
    assert out.out == f"healthy: {url}: HTTP 200\n" and out.err == ""
    status[0] = 503
    assert main(["health", "--http", url]) == 1
    assert capsys.readouterr().err == f"unhealthy: {url}: HTTP 503\n"


def test_health_of_the_queue_service_over_grpc_says_serving(tmp_path, capsys):
    from fedcl.queue import EmbeddingQueue
    from fedcl.server.queue_service import ServeSettings, start_queue_server

    server = start_queue_server(
        EmbeddingQueue(dim=4, capacity=8, per_site_quota=8, max_staleness=1, dtype="float32"),
        ServeSettings(host="127.0.0.1", port=0, coordinator_token="c" * 16, site_tokens={"a": "t" * 16}))
    try:
        assert main(["health", "--grpc", f"127.0.0.1:{server.port}"]) == 0
    finally:
        server.stop(grace=0.5)
    assert capsys.readouterr().out == f"healthy: 127.0.0.1:{server.port} (gRPC health): SERVING\n"


# ------------------------------------------------------------- revocation, SuperNode authentication


def _node_keys(tmp_path, *sites):
    subprocess.run([sys.executable, str(REPO / "deploy" / "make_certs.py"), "--out", str(tmp_path / "certs"),
                    *[a for s in sites for a in ("--site", s)]], check=True, capture_output=True)
    return {s: tmp_path / "certs" / "sites" / f"{s}.node-key.pub" for s in sites}


def _auth_config(tmp_path, keys, *extra):
    keys_toml = "{" + ", ".join(f'"{s}" = "{p}"' for s, p in keys.items()) + "}"
    return load_config(None, [f'server.tls_cert="{tmp_path}/s.pem"', f'server.tls_key="{tmp_path}/s.key"',
                              f'server.tls_ca="{tmp_path}/ca.pem"', "server.supernode_auth=true",
                              f"server.supernode_keys={keys_toml}", *extra])


def test_supernode_auth_starts_the_superlink_with_it_and_registers_all_but_revoked_keys(tmp_path):
    keys = _node_keys(tmp_path, "site-a", "site-b")
    cfg = _auth_config(tmp_path, keys, 'server.revoked_sites=["site-b"]')
    assert "--enable-supernode-auth" in superlink_command(cfg, port=9000)
    assert "--enable-supernode-auth" not in superlink_command(
        load_config(None, ["server.insecure=true"]), port=9000)
    assert check_supernode_keys(cfg) == {"site-a": keys["site-a"]}  # the revoked site's key stays out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"), (b"-----BEGIN PRIVATE KEY-----\n", "not an OpenSSH public key"),
        (b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOd2Kp4E1nrl6wM7BXbF2l3tF2C6x3nVAsD3fZ0GRS7J x\n",
         "not an EC key"),
    ],
)
def test_bad_supernode_key_files_are_named(tmp_path, content, message):
    path = tmp_path / "site-a.pub"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ServerCliError, match=rf"server\.supernode_keys\.site-a: .*{message}"):
        check_supernode_keys(_auth_config(tmp_path, {"site-a": path}))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (['server.site_tokens={a="t-0123456789"}', 'server.revoked_sites=["b"]'],
         "neither server.site_tokens"),
        (["server.supernode_auth=true"], "supernode_keys] is empty"),
        (["server.supernode_auth=true", "server.insecure=true", 'server.supernode_keys={a="k.pub"}'],
         "needs TLS"),
        (['server.supernode_keys={a="k.pub"}'], "supernode_auth = false"),
    ],
)
def test_revocation_and_node_auth_config_mistakes_are_explained(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def _fake_flwr(tmp_path, monkeypatch, script: str) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "flwr").write_text(f"#!{sys.executable}\n{script}")
    (bindir / "flwr").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


def test_registration_reads_flowers_answers(tmp_path, monkeypatch):
    # what `flwr supernode register --format json` prints: a node id, or an error (exit status 0 too)
    _fake_flwr(tmp_path, monkeypatch, """
import json, sys
key, name = sys.argv[3], sys.argv[sys.argv.index("--name") + 1]
if name == "new":
    print(json.dumps({"success": True, "node-id": 42}))
elif name == "known":
    print(json.dumps({"success": False, "error-message": "[code: 23] Public key already in use."}))
else:
    print(json.dumps({"success": False, "error-message": "[code: 1] the SuperLink said no"}))
""")
    env = dict(os.environ)
    assert register_supernode_keys({"new": tmp_path / "n.pub", "known": tmp_path / "k.pub"}, env=env) == {
        "new": 42, "known": None}
    with pytest.raises(ServerCliError,
                       match="could not register site other's SuperNode key .*the SuperLink said no"):
        register_supernode_keys({"other": tmp_path / "o.pub"}, env=env)


def test_queue_service_of_fedcl_server_refuses_revoked_sites(tmp_path):
    from fedcl.server.cli import _start_queue
    from fedcl.wire.queue_client import QueueClient, QueueServiceError

    tokens = {"site-a": "token-of-site-a-0123456789", "site-b": "token-of-site-b-0123456789"}
    cfg = load_config(
        None,
        ["server.insecure=true", "server.queue_port=0", f'server.out_dir="{tmp_path}"',
         "server.site_tokens={" + ", ".join(f'"{s}" = "{t}"' for s, t in tokens.items()) + "}",
         'server.revoked_sites=["site-b"]'],
    )
    server, cfg = _start_queue(cfg, generate_coordinator_token=True)
    try:
        address = f"127.0.0.1:{server.port}"
        with QueueClient(address, site_id="site-a", token=tokens["site-a"], timeout=5) as a:
            assert a.stats()["size"] == 0
        with QueueClient(address, site_id="site-b", token=tokens["site-b"], timeout=5) as b:
            with pytest.raises(QueueServiceError, match="PERMISSION_DENIED: site 'site-b' is revoked"):
                b.stats()
    finally:
        server.stop(grace=0)


def test_sites_are_told_to_join_only_once_their_keys_are_registered(tmp_path, monkeypatch, capsys):
    """A site that connected on the old cue (printed when the SuperLink came up, before the keys were
    registered) was refused as if its key were wrong."""
    import fedcl.server.cli as server_cli

    calls = []
    monkeypatch.setattr(server_cli, "check_supernode_keys", lambda cfg: {"site-a": tmp_path / "a.pub"})
    monkeypatch.setattr(server_cli, "register_supernode_keys",
                        lambda keys, env: calls.append("register") or {"site-a": 7})
    monkeypatch.setattr(server_cli, "submit_run", lambda **kw: calls.append("submit") or (1, 0))
    monkeypatch.setattr(server_cli, "run_status", lambda run_id, env: "finished:failed")
    cfg = load_config(None, ["server.insecure=true", f'server.out_dir="{tmp_path}"'])
    assert (
        server_cli.start_and_follow_run(cfg, superlink_address="127.0.0.1:1", join_address="coord:9092") == 1)
    out = capsys.readouterr().out
    assert calls == ["register", "submit"]
    assert out.index("registered: site-a (node 7)") < out.index(
        "sites join with fedcl-client --server coord:9092 (their SuperNode keys are registered now)")


def test_a_restarted_coordinator_says_what_the_sites_will_log(tmp_path):
    from fedcl.server.checkpoint import checkpoint_path
    from fedcl.server.cli import restart_note

    cfg = load_config(None, ["server.insecure=true", f'server.out_dir="{tmp_path}"'])
    assert restart_note(cfg) is None  # a fresh run
    path = checkpoint_path(tmp_path / "checkpoints")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    note = restart_note(cfg)
    assert note is not None and "resumes" in note and "HTTP 401" in note and "rejoin" in note


def _flwr_parts(text: str) -> tuple[dict, list[str]]:
    """The connection table and the `flwr run` argv that fedcl-server superlink's instructions give."""
    import shlex
    import tomllib

    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("[superlink."))
    end = lines.index("", start)
    run_line = next(line for line in lines if line.startswith("flwr run "))
    return tomllib.loads("\n".join(lines[start:end])), shlex.split(run_line)


def test_superlink_prints_the_flower_connection_and_the_exact_flwr_run_line(tmp_path):
    """What `fedcl-server superlink` prints once the SuperLink is up: what Flower's own parsers accept."""
    from flwr.cli.flower_config import parse_superlink_connection
    from flwr.common.config import parse_config_args

    from fedcl.server.cli import flwr_run_instructions

    config_json = tmp_path / "run dir" / "fedcl-config.json"  # a space: the line must still paste
    cfg = load_config(None,
                      ["server.insecure=true", 'server.coordinator_token="c"', 'server.site_tokens={a="x"}'])
    text = flwr_run_instructions(cfg, address="127.0.0.1:9093", config_json=config_json,
                                 queue_command=["fedcl-server", "queue", "--config", "/etc/my fedcl.toml"])
    table, argv = _flwr_parts(text)
    conn = parse_superlink_connection(table["superlink"]["fedcl"], "fedcl")
    assert (conn.address, conn.insecure, conn.root_certificates) == ("127.0.0.1:9093", True, None)
    assert argv[:5] == ["flwr", "run", ".", "fedcl", "--stream"] and argv[5] == "--run-config"
    assert parse_config_args([argv[6]]) == {"config-path": str(config_json)}
    assert "fedcl-server queue --config '/etc/my fedcl.toml'\n" in text  # the queue the run drives

    tls = load_config(None, [f'server.tls_cert="{tmp_path}/s.pem"', f'server.tls_key="{tmp_path}/s.key"',
                             f'server.tls_ca="{tmp_path}/ca.pem"', 'server.coordinator_token="c"'])
    table, _ = _flwr_parts(
        flwr_run_instructions(tls, address="coord.example.org:9093", config_json=config_json,
                              queue_command=["fedcl-server", "queue"])
    )
    conn = parse_superlink_connection(table["superlink"]["fedcl"], "fedcl")
    assert (conn.insecure, conn.root_certificates) == (False, f"{tmp_path}/ca.pem")


def test_superlink_instructions_register_node_keys_and_need_a_coordinator_token(tmp_path):
    from fedcl.server.cli import flwr_run_instructions

    keys = _node_keys(tmp_path, "site-a", "site-b")
    cfg = _auth_config(tmp_path, keys, 'server.revoked_sites=["site-b"]', 'server.coordinator_token="c"')
    text = flwr_run_instructions(cfg, address="h:1", config_json=tmp_path / "c.json", queue_command=["q"])
    assert f"flwr supernode register {keys['site-a']} fedcl --name site-a\n" in text
    assert "site-b" not in text  # revoked: not registered
    no_token = flwr_run_instructions(load_config(None, ["server.insecure=true"]), address="h:1",
                                     config_json=tmp_path / "c.json", queue_command=["q"])
    assert (
        "flwr run ." not in no_token and "server.coordinator_token" in no_token and no_token.count("\n") == 1)


def test_a_failed_runs_reason_is_read_from_this_runs_part_of_the_serverapp_log(tmp_path):
    from fedcl.server.cli import run_failure_reason

    log = tmp_path / "serverapp.log"
    log.write_text("Traceback (most recent call last):\n"
                   "fedcl.server.app.FederationError: an older run's refusal\n")
    start = log.stat().st_size
    with open(log, "a") as f:
        f.write("INFO :      round 1\nTraceback (most recent call last):\n  File \"app.py\", line 1\n"
                "fedcl.server.app.FederationError: checkpoint out/checkpoints/federation.pt belongs to a run "
                "with other settings (queue.enabled: True -> False); resume with that run's settings\n"
                "ERROR :     ServerApp thread raised an exception\n")
    assert run_failure_reason(log, start=start) == (
        "checkpoint out/checkpoints/federation.pt belongs to a run with other settings "
        "(queue.enabled: True -> False); resume with that run's settings")
    assert run_failure_reason(log) is not None
    log.write_text("Traceback (most recent call last):\nZeroDivisionError: division by zero\n")
    assert run_failure_reason(log) is None  # not one of fedcl's refusals: the log has it
    assert run_failure_reason(tmp_path / "missing.log") is None
