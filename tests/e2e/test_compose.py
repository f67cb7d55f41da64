"""docker-compose.yml, checked without Docker: every service's command runs as a local process.

The same commands and environment as in the compose file, with compose's names adapted to one
machine: service host names and listen addresses become 127.0.0.1 on a free port per (service,
container port), volume paths become folders of the test. Services start in depends_on order and
count as up when their own healthcheck command passes, as compose's service_healthy does.
``docker-compose config`` validates the file when that binary is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .helpers import REPO, free_port, process_env, read_history

COMPOSE = REPO / "docker-compose.yml"
# Smaller than the compose demo so that the test is quick: environment overrides of the settings
# deploy/compose/fedcl.toml leaves at their defaults (FEDCL_SECTION__KEY, see fedcl.config).
FAST = {
    "FEDCL_FEDERATION__NUM_ROUNDS": "2",
    "FEDCL_DATA__MAX_IMAGES_PER_SITE": "128",
    "FEDCL_DATA__TRAIN_MAX_IMAGES": "500",
    "FEDCL_DATA__EVAL_MAX_IMAGES": "200",
    "FEDCL_MODEL__WIDTH": "8",
    "FEDCL_MODEL__PROJ_DIM": "32",
    "FEDCL_MODEL__PROJ_HIDDEN": "64",
    "FEDCL_TRAIN__BATCH_SIZE": "64",
    "FEDCL_TRAIN__NUM_PUSH": "32",
    "FEDCL_TRAIN__THREADS": "1",
    "FEDCL_QUEUE__NUM_NEGATIVES": "128",
}
_ADDRESS = re.compile(r"(?<![\w.-])([A-Za-z][\w.-]*|\d+\.\d+\.\d+\.\d+):(\d{2,5})(?!\d)")


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_docker_compose_config_is_valid():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    out = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr


def test_compose_topology():
    services = _compose()["services"]
    assert {"superlink", "queue", "run", "site-0", "site-1", "site-2"} <= set(services)
    sites = [s for name, s in services.items() if name.startswith("site-")]
    partitions = {s["command"][s["command"].index("--partition-id") + 1] for s in sites}
    assert partitions == {"0", "1", "2"}  # each site its own part of the data
    state_volumes = {v.split(":")[0] for s in sites for v in s["volumes"]}
    assert len(state_volumes) == 3 and state_volumes <= set(_compose()["volumes"])  # named, one per site
    for name, service in services.items():
        if name != "run":
            assert service.get("healthcheck"), f"{name} has no healthcheck"
    assert all(dep["condition"] == "service_healthy" for dep in services["run"]["depends_on"].values())


class LocalCompose:
    """Turns compose services into local argv/env with loopback addresses and test folders."""

    def __init__(self, compose: dict, tmp: Path) -> None:
        self.services: dict = compose["services"]
        self.ports = {
            (name, int(p)): free_port() for name, s in self.services.items() for p in s.get("expose", [])}
        self.mounts: dict[str, dict[str, Path]] = {}
        for name, s in self.services.items():
            table = {}
            for volume in s.get("volumes", []):
                source, target = volume.split(":")[:2]
                if source.startswith("."):
                    table[target] = (REPO / source).resolve()
                else:
                    table[target] = tmp / "volumes" / source
                    table[target].mkdir(parents=True, exist_ok=True)
            self.mounts[name] = table

    def adapt(self, service: str, value: str) -> str:
        def address(m: re.Match) -> str:
            host, port = m.group(1), int(m.group(2))
            owner = service if host in ("127.0.0.1", "0.0.0.0", "localhost") else host
            if (owner, port) not in self.ports:
                raise AssertionError(f"{service}: {m.group(0)} is not an exposed port of a compose service")
            return f"127.0.0.1:{self.ports[(owner, port)]}"

        if any(h in value for h in (*self.services, "127.0.0.1", "0.0.0.0", "localhost")):
            value = _ADDRESS.sub(address, value)
        for target, source in sorted(self.mounts[service].items(), key=lambda kv: -len(kv[0])):
            if value == target or value.startswith(target + "/"):
                return str(source) + value[len(target):]
        return value

    def argv(self, service: str, command: list[str]) -> list[str]:
        return [self.adapt(service, str(part)) for part in command]

    def env(self, service: str, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        for key, value in (self.services[service].get("environment") or {}).items():
            env[key] = self.adapt(service, str(value))
        return env

    def order(self) -> list[str]:
        done: list[str] = []

        def visit(name: str) -> None:
            if name in done:
                return
            for dep in self.services[name].get("depends_on", {}):
                visit(dep)
            done.append(name)

        for name in self.services:
            visit(name)
        return done


def test_compose_services_run_as_local_processes(tmp_path, processes):
    local = LocalCompose(_compose(), tmp_path)
    base = process_env(tmp_path / "home", **FAST)
    healthy: set[str] = set()

    def is_healthy(name: str) -> bool:
        check = local.services[name]["healthcheck"]["test"]
        assert check[0] == "CMD"
        argv = local.argv(name, check[1:])
        return (
            subprocess.run(argv, env=local.env(name, base), capture_output=True, timeout=30).returncode == 0)

    for name in local.order():
        service = local.services[name]
        for dep, cond in (service.get("depends_on") or {}).items():
            assert cond["condition"] == "service_healthy"
            if dep not in healthy:
                processes.wait_for(
                    f"{dep} to be healthy", lambda dep=dep: is_healthy(dep), timeout=240, interval=1.0,
                    alive=[dep])
                healthy.add(dep)
        processes.start(name, local.argv(name, service["command"]), env=local.env(name, base))

    run = processes.procs["run"]
    started = time.time()
    processes.wait_for("the compose run to end", lambda: run.poll() is not None, timeout=540,
                       alive=["superlink", "queue", "site-0", "site-1", "site-2"])
    assert run.returncode == 0, processes.logs()

    out_dir = Path(local.adapt("run", "/runs/compose"))
    history = read_history(out_dir)
    assert [r["round"] for r in history] == [1, 2]
    for r in history:
        assert set(r["sites"]) == {"site-0", "site-1", "site-2"}, r["errors"]
        assert 0.0 <= r["knn"] <= 1.0
        assert all(m["num-examples"] == 128 for m in r["sites"].values())
    # round 2's release phase: 32 embeddings of the round's global model from each site; each site
    # trains on the other two sites' 64
    assert history[1]["release_phase"] == {"mode": "raw", "sites_ok": 3, "sites_failed": 0, "pushed": 96}
    assert history[1]["queue_size"] == 96 and all(
        m["negatives-used"] == 64 for m in history[1]["sites"].values())
    # the queue service keeps its snapshot in its own volume, the sites their state in theirs
    assert (tmp_path / "volumes" / "queue-state" / "queue-snapshot.npz").is_file()
    assert all((tmp_path / "volumes" / f"site-{i}-state" / "queue-token").is_file() for i in range(3))
    assert os.stat(tmp_path / "volumes" / "site-0-state" / "queue-token").st_mode & 0o077 == 0
    assert time.time() - started < 540
