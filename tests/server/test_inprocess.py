"""The in-process grid: the shipped ServerApp loop and ClientApp handlers with no simulation engine,
checked on its own (default tier) and against Flower's simulation engine, Ray (e2e tier)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

import fedcl.sim.inprocess
from fedcl.client.app import SiteError, make_client_app
from fedcl.config import load_config
from fedcl.models import canonical_state_dict, load_encoder
from fedcl.server.app import make_server_app, state_sha256
from fedcl.server.checkpoint import find_checkpoint
from fedcl.sim.inprocess import (
    FIRST_NODE_ID,
    InProcessGrid,
    run_apps,
    run_federation_inprocess,
    simulation_node_configs,
    task_identity,
)
from fedcl.sim.simulate import loopback_federation

TINY = [
    "data.name=synthetic", "data.num_sites=2", "data.partition=iid", "data.synthetic_images=200",
    "data.eval_max_images=100", "data.train_max_images=200", "model.width=4", "model.proj_hidden=32",
    "model.proj_dim=16", "train.batch_size=50", "train.num_push=20", "train.threads=1",
    "queue.num_negatives=64", "queue.warmup_rounds=1", "federation.num_rounds=2",
]


def test_node_configs_are_the_ones_flowers_simulation_gives_its_nodes():
    from flwr.server.superlink.fleet.vce.vce_api import _register_node_info_stores
    from flwr.supercore.run import Run

    stores = _register_node_info_stores({77: 0, 78: 1, 79: 2}, run=Run.create_empty(run_id=5))
    assert simulation_node_configs(3) == [stores[node].node_config for node in (77, 78, 79)]


def test_two_sites_two_rounds_in_process(tmp_path):
    cfg = load_config(None, TINY + ["train.persist_optimizer=true"])
    result = run_federation_inprocess(cfg, out_dir=tmp_path / "run")

    history = result.history
    assert [r["round"] for r in history] == [1, 2]
    for r in history:
        assert r["sites_ok"] == 2 and r["sites_failed"] == 0, r["errors"]
        assert set(r["sites"]) == {"site-0", "site-1"}  # node i is site i, as under Ray
        assert all(s["num-examples"] == 100 for s in r["sites"].values())  # iid halves of 200 images
        assert math.isfinite(r["loss"]) and 0.0 <= r["knn"] <= 1.0
    # warm-up round: no queue; round 2: a release phase (query messages), then each site trains on
    # the other site's 20 fresh embeddings through the loopback queue service
    assert all(s["negatives-used"] == 0 for s in history[0]["sites"].values())
    assert history[1]["release_phase"] == {"mode": "raw", "sites_ok": 2, "sites_failed": 0, "pushed": 40}
    assert [s["negatives-used"] for s in history[1]["sites"].values()] == [20.0, 20.0]
    # each node's Context.state lived from round 1 to round 2: the optimizer state came back
    assert [s["optimizer-resumed"] for s in history[0]["sites"].values()] == [0.0, 0.0]
    assert [s["optimizer-resumed"] for s in history[1]["sites"].values()] == [1.0, 1.0]
    assert set(history[1]["fed_eval"]["sites"]) == {"site-0", "site-1"}  # evaluate messages too

    ckpt = find_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt.round == 2 and [r["round"] for r in ckpt.history] == [1, 2]
    assert ckpt.history[1]["weights_sha256"] == history[1]["weights_sha256"]
    model, meta = load_encoder(result.encoder_path)
    assert meta["trained"] == "federated"  # the encoder is the checkpoint's final model
    assert state_sha256(canonical_state_dict(model)) == state_sha256(ckpt.state_dict)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    # the sites kept their ledgers in the state folder fedcl simulate gives them
    assert (tmp_path / "run" / "sites" / "site-1" / "ledger-site-1.json").is_file()


def _failing_on(partition: int, simulated) -> ClientApp:
    """The shipped ClientApp, except that one node's site fails to train."""
    shipped = make_client_app(simulated=simulated)
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context) -> Message:
        if context.node_config["partition-id"] == partition:
            context.state["touched"] = ConfigRecord({"by": "the failing handler"})
            raise SiteError(f"site-{partition}: its data folder is gone")
        return shipped(msg, context)

    @app.query()
    def _query(msg: Message, context) -> Message:
        return shipped(msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context) -> Message:
        return shipped(msg, context)

    return app


def test_a_handler_that_raises_is_an_error_reply_and_the_round_goes_on(tmp_path):
    cfg = load_config(None, TINY)
    out = tmp_path / "run"
    with loopback_federation(cfg, out_dir=out, threads=1) as (link, simulated):
        results: list = []
        server_app = make_server_app(config=cfg, out_dir=out, queue=link, results=results)
        grid = run_apps(server_app, _failing_on(1, simulated), num_nodes=2)
    history = results[0].history
    for r in history:  # site-1 dropped out of each round; site-0 trained alone
        assert set(r["sites"]) == {"site-0"} and r["sites_failed"] == 1
        assert r["errors"] == [f"node {FIRST_NODE_ID + 1}: "
                               "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
                               "ClientAppException occurred. Message: site-1: its data folder is gone'>"]
    assert find_checkpoint(out / "checkpoints").round == 2
    # a handler that raised leaves its node's context as it was (Flower keeps only a reply's context)
    assert "touched" not in grid.contexts[FIRST_NODE_ID + 1].state

    # the error reply itself, as Flower's simulation writes it
    with task_identity(1):
        msg = Message(RecordDict(), dst_node_id=FIRST_NODE_ID + 1, message_type="train")
        (reply,) = grid.send_and_receive([msg])
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert reply.metadata.src_node_id == FIRST_NODE_ID + 1


def test_a_budget_refusal_reaches_the_loop_through_flowers_error_reply(tmp_path):
    """The shipped handler refuses on its privacy budget with an error reply of fedcl's own code
    (BUDGET_REFUSED); the grid passes it on as Flower would, and the loop stops cleanly."""
    cfg = load_config(None, TINY + ["federation.num_rounds=3", "privacy.dpsgd=true",
                                    "train.in_batch_negatives=false", "privacy.release=gaussian",
                                    "privacy.epsilon_budget=6.0"])
    result = run_federation_inprocess(cfg, out_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    stopped = summary["stopped_for_privacy_budget_at_round"]
    assert stopped == 2 and [r["round"] for r in result.history] == [1]  # round 2 would pass ε = 6
    assert result.history[0]["sites_ok"] == 2
    assert all(0 < m["epsilon"] <= 6.0 for m in result.history[0]["sites"].values())


def test_insecure_reproducible_dp_makes_a_dp_run_repeat_and_says_so_in_the_ledgers(tmp_path):
    """bench/quality.py's DP rows: with the switch, two runs from the same global torch seed draw the same
    DP-SGD noise (the same weights), and every site's ledger records that its randomness was not private."""
    cfg = load_config(None, TINY + ["queue.enabled=false", "privacy.dpsgd=true",
                                    "train.in_batch_negatives=false", "privacy.noise_multiplier=1.0"])
    runs = []
    for i in range(2):
        torch.manual_seed(0)  # the switch draws noise from the global generator; bench/quality.py seeds it
        runs.append(run_federation_inprocess(cfg, out_dir=tmp_path / f"run{i}",
                                             insecure_reproducible_dp=True))
    assert [r["knn"] for r in runs[0].history] == [r["knn"] for r in runs[1].history]
    weights = [canonical_state_dict(load_encoder(r.encoder_path)[0]) for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert set(runs[0].ledgers) == {"site-0", "site-1"}
    assert all(ledger["insecure_randomness"] for ledger in runs[0].ledgers.values())
    plain = run_federation_inprocess(cfg, out_dir=tmp_path / "plain")  # default: secret noise
    assert not any(ledger["insecure_randomness"] for ledger in plain.ledgers.values())


def _echo_app() -> ClientApp:
    app = ClientApp()

    @app.query()
    def _query(msg: Message, context) -> Message:
        seen = int(context.state["seen"]["n"]) + 1 if "seen" in context.state else 1
        context.state["seen"] = ConfigRecord({"n": seen})
        torch.set_num_threads(3)  # what a handler's configure_threads does
        return Message(RecordDict({"echo": ConfigRecord({"node": context.node_config["partition-id"],
                                                         "seen": seen})}), reply_to=msg)

    return app


def test_grid_keeps_each_nodes_context_and_the_servers_threads(monkeypatch):
    grid = InProcessGrid(_echo_app(), simulation_node_configs(2))
    assert list(grid.get_node_ids()) == [FIRST_NODE_ID, FIRST_NODE_ID + 1]
    threads = torch.get_num_threads()
    with task_identity(1):
        for _ in range(2):
            replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="query")
                                             for n in grid.get_node_ids()])
            assert [dict(r.content["echo"]) for r in replies] == [{"node": 0, "seen": _ + 1},
                                                                  {"node": 1, "seen": _ + 1}]
        assert torch.get_num_threads() == threads

        # a message to a node that is not there is dropped (no reply), as Flower's link state drops it
        assert list(grid.send_and_receive([Message(RecordDict(), dst_node_id=5, message_type="query")])) == []

        # a reply that comes back after the timeout is not returned, but can still be pulled
        clock = iter([100.0, 100.5, 102.0])  # send at 100; first reply at 100.5, second at 102
        monkeypatch.setattr(fedcl.sim.inprocess, "time", SimpleNamespace(monotonic=lambda: next(clock)))
        msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in grid.get_node_ids()]
        replies = list(grid.send_and_receive(msgs, timeout=1.0))
        assert [r.metadata.reply_to_message_id for r in replies] == [msgs[0].metadata.message_id]
        (late,) = grid.pull_messages([msgs[1].metadata.message_id])
        assert late.content["echo"]["node"] == 1


# ------------------------------------------------------------------------- against Ray (e2e tier)


def _ray_run(out: Path, overrides: list[str]) -> list[dict]:
    """``fedcl simulate --engine ray`` in its own process (a second Ray session in one pytest process
    can fail to start); its metrics.jsonl."""
    argv = [sys.executable, "-m", "fedcl.cli", "simulate", "--engine", "ray", "--out", str(out)]
    for item in overrides:
        argv += ["-s", item]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"fedcl simulate --engine ray failed:\n{tail}"
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


LOSS_RTOL = 1e-5
KNN_ATOL = 0.011  # one of the 100 evaluation images


@pytest.mark.e2e
def test_in_process_and_ray_give_the_same_metrics_at_the_same_seed(tmp_path):
    """The same 2-site, 2-round federation (queue on) under Ray and in-process.

    Equal by construction: model init, augmentations, release picks and the sites' data all derive
    from the seed, both engines pin torch to train.threads = 1 thread per site, and FedAvg of two
    sites is exact in either reply order (x1 w1 + x2 w2 commutes). What is not bit-equal: the queue
    service draws each site's negatives with its own unseeded generator. With queue.num_negatives 64
    above the 20 eligible entries a site draws all of them, in a random order, so only the float
    summation order of each InfoNCE denominator differs: losses agree to LOSS_RTOL, and the round-2
    weights only to float rounding, so the digest of round 2's weights is not compared.
    """
    ray_history = _ray_run(tmp_path / "ray", TINY)
    local = run_federation_inprocess(load_config(None, TINY), out_dir=tmp_path / "inprocess").history

    assert [r["round"] for r in local] == [r["round"] for r in ray_history] == [1, 2]
    assert local[0]["weights_sha256"] == ray_history[0]["weights_sha256"]  # the same initial weights
    for mine, theirs in zip(local, ray_history, strict=False):
        for key in ("sites_ok", "sites_failed", "negatives_used", "pushed", "queue_size", "release_phase",
                    "random_init_knn"):
            assert mine[key] == theirs[key], (mine["round"], key)
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=LOSS_RTOL)
        assert mine["knn"] == pytest.approx(theirs["knn"], abs=KNN_ATOL), "kNN: over 1 of 100 images apart"
        assert set(mine["sites"]) == set(theirs["sites"])
        for site, m in mine["sites"].items():
            t = theirs["sites"][site]
            for key in ("num-examples", "negatives-used", "pushed", "steps", "optimizer-resumed"):
                assert m[key] == t[key], (mine["round"], site, key)
            assert m["loss"] == pytest.approx(t["loss"], rel=LOSS_RTOL), (mine["round"], site)
