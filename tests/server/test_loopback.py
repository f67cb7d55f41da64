"""The run's own queue service (``fedcl.server.loopback``): what ``flwr run .`` gets when its config
names no queue service. The shipped ServerApp and ClientApp (``fedcl.server.app:app``,
``fedcl.client.app:app``, as pyproject.toml names them) on the in-process grid, with the node
configs Flower's simulation gives its nodes, so no Ray."""

from __future__ import annotations

import json

from flwr.app import Context, RecordDict

import fedcl.client.app
import fedcl.server.app
from fedcl.server.loopback import SITE_TOKEN_DIR_NAME
from fedcl.sim.inprocess import InProcessGrid, simulation_node_configs, task_identity

TINY_TOML = """
[data]
name = "synthetic"
num_sites = 2
partition = "iid"
synthetic_images = 200
eval_max_images = 100
train_max_images = 200
[model]
width = 4
proj_hidden = 32
proj_dim = 16
[train]
batch_size = 50
num_push = 20
threads = 1
[queue]
num_negatives = 64
warmup_rounds = 1
[federation]
num_rounds = 2
"""


def _run_shipped_apps(run_config: dict, num_nodes: int = 2) -> None:
    grid = InProcessGrid(fedcl.client.app.app, simulation_node_configs(num_nodes), run_id=7)
    context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with task_identity(7):
        fedcl.server.app.app(grid=grid, context=context)


def test_the_shipped_serverapp_serves_a_queue_for_a_run_whose_config_names_none(tmp_path):
    config, out = tmp_path / "tiny.toml", tmp_path / "out"
    config.write_text(TINY_TOML)  # no server.coordinator_token: no queue service is configured
    _run_shipped_apps({"config-path": str(config), "out-dir": str(out)})

    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["sites_ok"] for r in history] == [2, 2], [r["errors"] for r in history]
    assert history[1]["queue_size"] == 2 * 20  # round 2 (after the warm-up): both sites pushed to it
    audit = [json.loads(line) for line in (out / "queue-audit.jsonl").read_text().splitlines()]
    for event in ("push", "sample"):  # each site with the token the run gave it
        assert {e["site"] for e in audit if e["event"] == event} == {"site-0", "site-1"}, audit
    assert audit[-1]["event"] == "stop"  # stopped with the run
    assert not (out / SITE_TOKEN_DIR_NAME).exists()  # the tokens went with the run
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def test_a_run_in_a_flower_per_run_environment_says_how_to_avoid_it():
    from fedcl.server.app import flower_runtime_env_note

    note = flower_runtime_env_note({"VIRTUAL_ENV": "/home/u/.flwr/runtime-envs/1234"})
    assert note is not None and "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in note and "\n" not in note
    assert flower_runtime_env_note({"VIRTUAL_ENV": "/home/u/fedcl/.venv"}) is None
    assert flower_runtime_env_note({}) is None


def test_a_config_whose_sites_hold_their_own_tokens_but_names_no_coordinator_token_is_refused_at_once(
    tmp_path,
):
    """`flwr run . <connection>` against a deployment's SuperLink with such a config: the run's own
    loopback queue would hand out new tokens the sites (fedcl-client, their own tokens) never use."""
    import pytest

    from fedcl.server.app import FederationError

    config, out = tmp_path / "deploy.toml", tmp_path / "out"
    config.write_text(TINY_TOML + '[server]\nsite_tokens = {site-0 = "token-of-site-0-xxxxxxxx"}\n')
    with pytest.raises(FederationError,
                       match=r"server\.site_tokens .* no server\.coordinator_token.*fedcl-server"):
        _run_shipped_apps({"config-path": str(config), "out-dir": str(out)})
    assert not out.exists()  # refused before any round, queue or file
