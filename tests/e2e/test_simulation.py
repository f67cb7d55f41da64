"""`fedcl simulate`'s driver end to end: Flower's simulation engine (Ray), 2 sites, 2 rounds."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import pytest

from fedcl.config import load_config
from fedcl.models import load_encoder
from fedcl.server.checkpoint import find_checkpoint
from fedcl.sim.simulate import run_simulation_main

TINY = [
    "data.name=synthetic", "data.num_sites=2", "data.partition=iid", "data.synthetic_images=400",
    "data.eval_max_images=200", "data.train_max_images=400", "model.width=8", "model.proj_hidden=64",
    "model.proj_dim=32", "train.batch_size=64", "train.num_push=64", "train.threads=1",
    "queue.num_negatives=256", "queue.warmup_rounds=1", "federation.num_rounds=2",
]


def test_simulation_two_sites_two_rounds(tmp_path):
    cfg = load_config(None, TINY)
    out = io.StringIO()
    summary = run_simulation_main(cfg, out_dir=tmp_path / "sim", progress=False, stream=out)

    history = summary["history"]
    assert [r["round"] for r in history] == [1, 2]
    for r in history:
        assert r["sites_ok"] == 2 and r["sites_failed"] == 0, r["errors"]
        assert set(r["sites"]) == {"site-0", "site-1"}
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert 0.0 <= r["knn"] <= 1.0
        for site in r["sites"].values():
            assert site["num-examples"] == 200  # iid halves of 400 images
            assert site["pushed"] == 0  # fresh push: nothing after training
    # warm-up round: no release, no queue negatives. Round 2: a release phase (Flower query messages
    # through Ray) in which each site pushes 64 embeddings of the global model it just received; then
    # each site trains on the other site's 64, never its own; they are evicted when the round ends
    assert all(s["negatives-used"] == 0 for s in history[0]["sites"].values())
    assert history[0]["release_phase"] == {} and history[0]["queue_size"] == 0
    assert history[1]["release_phase"] == {"mode": "raw", "sites_ok": 2, "sites_failed": 0, "pushed": 128}
    assert all(s["negatives-used"] == 64.0 for s in history[1]["sites"].values())
    assert history[1]["queue_size"] == 128 and history[1]["queue"]["size"] == 0
    # the final round also asked every site for its label-free check of the final model
    assert set(history[1]["fed_eval"]["sites"]) == {"site-0", "site-1"}

    assert summary["rounds"] == 2 and summary["resumed_from"] == 0
    assert summary["random_init_knn"] is not None and summary["final_knn"] == history[-1]["knn"]
    model, meta = load_encoder(summary["encoder"])  # what `fedcl eval` reads
    assert model.spec["proj_dim"] == 32 and meta["trained"] == "federated"
    ckpt = find_checkpoint(tmp_path / "sim" / "checkpoints")
    assert ckpt.round == 2 and len(ckpt.history) == 2
    for plot in summary["plots"]:
        with open(plot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = out.getvalue()
    assert (
        "kNN acc" in text
        and "random init" in text
        and text.rstrip().splitlines()[-1].startswith("fedcl simulate:"))


def test_dp_simulation_reports_epsilon_per_site_and_stops_on_budget(tmp_path):
    """DP-SGD + Gaussian release through Flower's simulation: ε per site per round, cumulative,
    and a budget stop that really stops (every site refuses, the run ends cleanly)."""
    # through the CLI in its own process: a second Ray session inside one pytest process can fail to start
    overrides = TINY + ["federation.num_rounds=3", "privacy.dpsgd=true", "train.in_batch_negatives=false",
                        "privacy.release=gaussian", "privacy.epsilon_budget=6.0"]
    argv = [sys.executable, "-m", "fedcl.cli", "simulate", "--out", str(tmp_path)]
    for item in overrides:
        argv += ["-s", item]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stops" in proc.stdout + proc.stderr or "privacy budget" in proc.stdout + proc.stderr
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in history if "sites" in r]
    assert [r["round"] for r in rounds] == [1]  # round 2 would pass ε = 6 at every site
    eps1 = {site: m["epsilon"] for site, m in rounds[0]["sites"].items()}
    assert set(eps1) == {"site-0", "site-1"} and all(0 < e <= 6.0 for e in eps1.values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_for_privacy_budget_at_round"] == 2
    from fedcl.privacy.ledger import PrivacyLedger

    for site in ("site-0", "site-1"):
        ledger = PrivacyLedger.load(next(tmp_path.rglob(f"ledger-{site}.json")))
        assert ledger.epsilon() == pytest.approx(eps1[site]) and ledger.epsilon() <= 6.0
        assert max(e.round for e in ledger.events) == 1  # nothing trained or pushed after the stop
