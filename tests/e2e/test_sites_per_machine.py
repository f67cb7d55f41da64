"""Two sites on one machine: two fedcl-client processes, neither given --runtime-address, join one
loopback federation (fedcl-server run) and both train in its round. Each picks its own runtime
port and says which; before fedcl-client picked one, both took Flower's default 9094 and the second
SuperNode failed to start, again and again."""

from __future__ import annotations

import re
import sys

from .helpers import (
    free_port,
    process_env,
    read_history,
    server_argv,
    site_tokens,
    tiny_config_text,
    write_site_data,
)

RUNTIME_LINE = re.compile(r"fedcl-client: check runtime port: ok: .* listen on 127\.0\.0\.1:(\d+) ")


def test_two_sites_on_one_machine_pick_their_own_runtime_ports(tmp_path, processes):
    port, queue_port = free_port(), free_port()
    tokens = site_tokens(2)
    cfg = tmp_path / "fedcl.toml"
    cfg.write_text(
        tiny_config_text(out_dir=tmp_path / "run", superlink_port=port, num_rounds=1, tokens=tokens,
                         queue_port=queue_port)
    )
    data = write_site_data(cfg, tmp_path)
    env = process_env(tmp_path / "home")
    processes.start("server", server_argv("run", "--config", str(cfg)), env=env)
    for i, site in enumerate(tokens):
        token_file = tmp_path / f"{site}.token"
        token_file.write_text(tokens[site])
        processes.start(site, [sys.executable, "-m", "fedcl.client.cli", "--server", f"127.0.0.1:{port}",
                               "--data", str(data[i]), "--site-id", site, "--token-file", str(token_file),
                               "--state-dir", str(tmp_path / "sites" / site), "--insecure",
                               "--queue-address", f"127.0.0.1:{queue_port}"], env=env)

    def runtime_ports() -> list[int]:
        return [
            int(m.group(1))
            for site in tokens
            for m in [RUNTIME_LINE.search(processes.log(site, tail=10**6))]
            if m]

    processes.wait_for("both sites to say which runtime port they use", lambda: len(runtime_ports()) == 2,
                       timeout=120, alive=list(tokens))
    first, second = runtime_ports()
    assert first != second

    server = processes.procs["server"]
    processes.wait_for("the run to end", lambda: server.poll() is not None, timeout=540, alive=list(tokens))
    assert server.returncode == 0, processes.logs()
    history = read_history(tmp_path / "run")
    assert [r["round"] for r in history] == [1]
    assert history[0]["sites_ok"] == 2 and set(history[0]["sites"]) == set(tokens), history[0]["errors"]
    for site in tokens:
        log = processes.log(site, tail=10**6)
        assert "address already in use" not in log and "failed to start" not in log
        # accepted, or said not checked when the queue service came up after the site
        assert "check queue token: ok: " in log or "check queue token: not checked: " in log
