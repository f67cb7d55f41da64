"""Helpers for the end-to-end federation tests: tiny configs, site data, processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedcl.bound_child import popen_bound

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


PATIENCE = float(os.environ.get("FEDCL_E2E_PATIENCE", "3"))  # see Processes.wait_for


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_config_text(*, out_dir: Path, superlink_port: int, num_sites: int = 2, num_rounds: int = 2,
                     min_nodes: int = 2, tokens: dict[str, str] | None = None, extra: str = "",
                     queue_port: int = 0, coordinator_token: str | None = None, certs: Path | None = None,
                     server_extra: str = "", privacy: str = "", train_extra: str = "",
                     queue_extra: str = "") -> str:
    """A federation small enough for a test: synthetic 28x28 images, an 8-wide CNN, one thread."""
    tokens = tokens if tokens is not None else site_tokens(num_sites)
    token_lines = "\n".join(f'{site} = "{tok}"' for site, tok in tokens.items())
    coordinator = f'coordinator_token = "{coordinator_token}"' if coordinator_token else ""
    if certs is None:
        tls = "insecure = true"
    else:
        tls = (f'insecure = false\ntls_cert = "{certs / "server.pem"}"\ntls_key = "{certs / "server.key"}"\n'
               f'tls_ca = "{certs / "ca.pem"}"')
    return f"""
[data]
name = "synthetic"
num_sites = {num_sites}
partition = "iid"
synthetic_images = 400
eval_max_images = 200
train_max_images = 400

[model]
width = 8
proj_hidden = 64
proj_dim = 32

[train]
batch_size = 64
num_push = 64
threads = 1
{train_extra}

[queue]
num_negatives = 256
warmup_rounds = 1
{queue_extra}

[privacy]
{privacy}

[federation]
num_rounds = {num_rounds}
min_available_nodes = {min_nodes}
min_train_nodes = {min_nodes}
{extra}

[server]
{tls}
superlink_port = {superlink_port}
queue_port = {queue_port}
out_dir = "{out_dir}"
{coordinator}
{server_extra}

[server.site_tokens]
{token_lines}
"""


def site_tokens(num_sites: int) -> dict[str, str]:
    return {f"site-{i}": f"test-token-of-site-{i}-{'x' * 8}" for i in range(num_sites)}


def write_site_data(config_path: Path, out: Path) -> list[Path]:
    """Each site's partition of the config's data set as a MedMNIST-style .npz (what --data reads)."""
    from fedcl.config import load_config
    from fedcl.runtime import load_split, site_partition

    cfg = load_config(config_path)
    full = load_split(cfg.data, split="train")
    paths = []
    for i in range(cfg.data.num_sites):
        part = site_partition(cfg.data, full, site_index=i)
        path = out / f"site-{i}.npz"
        np.savez(path, train_images=part.images[:, 0].numpy(), train_labels=part.labels.numpy())
        paths.append(path)
    return paths


def process_env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "HOME": str(home),  # Flower keeps ~/.flwr state: keep it inside the test's folder
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "GRPC_VERBOSITY": "ERROR",
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("FLWR_HOME", None)
    env.update(extra)
    return env


class Processes:
    """Processes started in their own sessions, so that stopping one stops its children too."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], *, env: dict[str, str],
              cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        # its own session (stopping it stops its children), ended by SIGTERM if pytest itself dies
        proc = popen_bound(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"===== {name} =====\n{self.log(name)}" for name in self.procs)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for _name, proc in self.procs.items():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():  # and whatever is left of each session
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def wait_for(self, what: str, predicate, *, timeout: float, interval: float = 0.5,
                 alive: list[str] = ()) -> None:
        """Wait for an event (``predicate()`` true); fail at once when a process in ``alive`` exits. The
        timeout, a backstop, is ``timeout`` (what an idle 2-core machine needs, with room) times
        PATIENCE, so that a machine shared with other jobs (load average 8-15) does not fail a drill."""
        timeout *= PATIENCE
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            for name in alive:
                if self.procs[name].poll() is not None:
                    pytest.fail(
                        f"{name} exited ({self.procs[name].returncode}) while waiting for {what}\n"
                        f"{self.logs()}"
                    )
            time.sleep(interval)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")


def server_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedcl.server.cli", *args]


def client_argv(*, port: int, data: Path, site_id: str, token_file: Path, state_dir: Path, runtime_port: int,
                extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "fedcl.client.cli", "--server", f"127.0.0.1:{port}", "--data", str(data),
            "--site-id", site_id, "--token-file", str(token_file), "--state-dir", str(state_dir),
            "--runtime-address", f"127.0.0.1:{runtime_port}", *(extra or ("--insecure",))]


def read_history(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else [])


def checkpoint_round(out_dir: Path) -> int:
    from fedcl.server.checkpoint import CheckpointError, find_checkpoint

    try:
        ckpt = find_checkpoint(out_dir / "checkpoints")
    except CheckpointError:
        return 0
    return ckpt.round if ckpt is not None else 0


def make_certs(out: Path, sites: list[str]) -> tuple[str, dict[str, str]]:
    """A consortium CA, a server certificate for 127.0.0.1 and site tokens (deploy/make_certs.py)."""
    import tomllib

    subprocess.run(
        [sys.executable, str(REPO / "deploy" / "make_certs.py"), "--out", str(out), "--server-name",
         "localhost", "--server-ip", "127.0.0.1", *[a for s in sites for a in ("--site", s)]],
        check=True, capture_output=True,
    )
    tokens = tomllib.loads((out / "tokens.toml").read_text())
    return tokens["coordinator_token"], dict(tokens["site_tokens"])


def start_sites(tmp_path: Path, processes: Processes, *, port: int, tokens: dict[str, str], data: list[Path],
                env: dict, certs: Path | None = None) -> None:
    """One fedcl-client per site of ``tokens`` (site i on data[i]), each with its own state folder and
    runtime port, joining the SuperLink on 127.0.0.1:port. certs: make_certs' folder (its token files
    and CA); None: insecure, each token written to <tmp_path>/<site>.token."""
    for i, site in enumerate(tokens):
        if certs is not None:
            token_file, extra = (certs / "sites" / f"{site}.token",
                                 ("--root-certificates", str(certs / "ca.pem")))
        else:
            token_file, extra = tmp_path / f"{site}.token", ("--insecure",)
            token_file.write_text(tokens[site])
        processes.start(site, client_argv(port=port, data=data[i], site_id=site, token_file=token_file,
                                          state_dir=tmp_path / "sites" / site, runtime_port=free_port(),
                                          extra=extra), env=env)


def start_federation(tmp_path: Path, processes: Processes, *, num_rounds: int = 2, min_nodes: int = 2,
                     extra_config: str = "", tls: bool = False, queue_extra: str = "") -> dict:
    """fedcl-server run + two fedcl-client sites on loopback; returns paths and ports.

    tls: certificates and tokens from deploy/make_certs.py, TLS on the SuperLink and the queue."""
    port = free_port()
    out_dir = tmp_path / "run"
    certs = tmp_path / "certs" if tls else None
    coordinator = None
    if certs is not None:
        coordinator, tokens = make_certs(certs, ["site-0", "site-1"])
    else:
        tokens = site_tokens(2)
    cfg = tmp_path / "fedcl.toml"
    cfg.write_text(
        tiny_config_text(out_dir=out_dir, superlink_port=port, num_rounds=num_rounds, min_nodes=min_nodes,
                         tokens=tokens, extra=extra_config, coordinator_token=coordinator, certs=certs,
                         queue_extra=queue_extra)
    )
    data = write_site_data(cfg, tmp_path)
    env = process_env(tmp_path / "home")
    processes.start("server", server_argv("run", "--config", str(cfg)), env=env)
    start_sites(tmp_path, processes, port=port, tokens=tokens, data=data, env=env, certs=certs)
    return {"config": cfg, "out_dir": out_dir, "port": port, "env": env, "tokens": tokens, "data": data}
