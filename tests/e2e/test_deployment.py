"""Real processes on loopback: fedcl-server run (queue service + SuperLink + ServerApp) and two
fedcl-client sites (Flower SuperNodes), 2 rounds, with TLS and per-site tokens as in a real
consortium (credentials from deploy/make_certs.py)."""

from __future__ import annotations

import json
import math

from fedcl.models import load_encoder

from .helpers import read_history, start_federation


def test_deployment_reaches_final_round(tmp_path, processes):
    fed = start_federation(tmp_path, processes, num_rounds=2, tls=True)
    server = processes.procs["server"]
    processes.wait_for(
        "the run to end", lambda: server.poll() is not None, timeout=540, alive=["site-0", "site-1"])
    assert server.returncode == 0, processes.logs()

    out = fed["out_dir"]
    history = read_history(out)
    assert [r["round"] for r in history] == [1, 2]
    for r in history:
        assert r["sites_ok"] == 2 and r["sites_failed"] == 0, r["errors"]
        assert set(r["sites"]) == {"site-0", "site-1"}  # site ids as the sites named themselves
        assert math.isfinite(r["loss"]) and 0.0 <= r["knn"] <= 1.0
    assert all(s["negatives-used"] == 0 for s in history[0]["sites"].values())  # warm-up
    # round 2's release phase (a query message to each SuperNode): each site pushed 64 embeddings of the
    # global model it had just received; each trained on the other's 64; evicted when the round ended
    assert history[1]["release_phase"] == {"mode": "raw", "sites_ok": 2, "sites_failed": 0, "pushed": 128}
    assert all(s["negatives-used"] == 64.0 for s in history[1]["sites"].values())
    assert history[1]["queue_size"] == 128 and history[1]["queue"]["per_site"] == {"site-0": 0, "site-1": 0}

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_knn"] == history[-1]["knn"]
    model, meta = load_encoder(out / "encoder.pt")
    assert meta["rounds"] == 2 and model.spec["width"] == 8
    assert (out / "queue-snapshot.npz").is_file() and (out / "accuracy.png").is_file()
    assert "round 2/2" in (out / "serverapp.log").read_text()  # the ServerApp's log, as Flower streamed it
    assert "finished:completed" in processes.log("server")
    # every queue call was authenticated: the audit log names both sites and no rejection
    audit = [json.loads(line) for line in (out / "queue-audit.jsonl").read_text().splitlines()]
    assert {e.get("site") for e in audit if e.get("event") == "push"} == {"site-0", "site-1"}
    assert not [e for e in audit if e.get("event") == "rejection"]
