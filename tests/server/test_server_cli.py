"""fedcl-server's pieces that need no running federation: the app folder, SuperLink flags, health."""

from __future__ import annotations

import json

import pytest
from flwr.cli.config_utils import load_and_validate

from fedcl.config import load_config
from server.cli import (
    ServerCliError,
    _resolve_paths,
    main,
    superlink_command,
    write_app_dir,
    write_effective_config,
)


def test_app_folder_is_a_valid_flower_app_pointing_at_the_installed_components(tmp_path):
    app_dir = write_app_dir(tmp_path / "app")
    config, _warnings = load_and_validate(app_dir / "pyproject.toml")
    assert config["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.app:app",
                                                           "clientapp": "client.app:app"}
    assert set(config["tool"]["flwr"]["app"]["config"]) == {"config-path", "out-dir"}  # what fedcl-server sets
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
    cfg = _resolve_paths(load_config(None, ['server.out_dir="rel/out"', 'server.site_tokens={a="x"}']), out_dir=None)
    assert cfg.server.out_dir == tmp_path / "rel" / "out"
    path = write_effective_config(cfg, cfg.server.out_dir)
    assert path.stat().st_mode & 0o077 == 0  # it holds the queue tokens
    assert json.loads(path.read_text())["server"]["site_tokens"] == {"a": "x"}


def test_health_and_config_errors_exit_non_zero(tmp_path, capsys):
    assert main(["health", "--grpc", "127.0.0.1:1", "--timeout", "0.5"]) == 1
    assert main(["health", "--http", "http://127.0.0.1:1/health", "--timeout", "0.5"]) == 1
    assert main(["start-run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
