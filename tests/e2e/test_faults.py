"""Faults with real processes on loopback: a site dies mid-round; the coordinator dies and restarts."""

from __future__ import annotations

import json
import re

from fedcl.config import FederationSettings
from fedcl.server.app import _comparable_queue_stats, state_sha256
from fedcl.server.checkpoint import find_checkpoint, load_checkpoint

from .helpers import (
    checkpoint_round,
    free_port,
    process_env,
    read_history,
    server_argv,
    site_tokens,
    start_federation,
    start_sites,
    tiny_config_text,
    write_site_data,
)

# A dead site is noticed when Flower's heartbeat for its node expires (about 60 s: the SuperLink then
# answers its message "Node Unavailable"); round_timeout is only the backstop, and generous, so that a
# live site training slowly on a loaded machine is never cut (40 s was, at load average 8-13).
ROUND_TIMEOUT = "round_timeout = 600" if "round_timeout" in FederationSettings.model_fields else ""


def test_site_killed_mid_round_the_round_completes_with_the_others(tmp_path, processes):
    port, queue_port = free_port(), free_port()
    out_dir = tmp_path / "run"
    tokens = site_tokens(2)
    cfg = tmp_path / "fedcl.toml"
    cfg.write_text(
        tiny_config_text(out_dir=out_dir, superlink_port=port, queue_port=queue_port, num_rounds=2,
                         min_nodes=1, tokens=tokens, coordinator_token="test-coordinator-token-xyz",
                         extra=ROUND_TIMEOUT)
    )
    data = write_site_data(cfg, tmp_path)
    env = process_env(tmp_path / "home")
    processes.start("superlink", server_argv("superlink", "--config", str(cfg)), env=env)
    processes.start("queue", server_argv("serve-queue", "--config", str(cfg)), env=env)
    start_sites(tmp_path, processes, port=port, tokens=tokens, data=data, env=env)
    # both sites connected before the run starts, so that round 1 samples both
    superlink_log = tmp_path / "logs" / "superlink.log"
    processes.wait_for(
        "both sites to connect",
        lambda: (
            superlink_log.exists()
            and len(re.findall(r"Activated node_id", superlink_log.read_text(errors="replace"))) >= 2),
        timeout=180, alive=["superlink", "queue", "site-0", "site-1"],
    )
    processes.start("run", server_argv("start-run", "--config", str(cfg)), env=env)

    # kill site-1 (its SuperNode and the ClientApp it is starting) once it has taken round 1's message
    processes.wait_for("site-1 to receive the round-1 message",
                       lambda: "Receiving: train message" in processes.log("site-1", tail=100_000),
                       timeout=240, interval=0.2, alive=["run", "site-0", "site-1"])
    processes.kill("site-1")

    run = processes.procs["run"]
    processes.wait_for(
        "the run to end", lambda: run.poll() is not None, timeout=400, alive=["superlink", "site-0"])
    assert run.returncode == 0, processes.logs()
    history = read_history(out_dir)
    assert [r["round"] for r in history] == [1, 2]
    first, second = history
    assert set(first["sites"]) == {"site-0"} and first["sites_failed"] == 1, first["errors"]
    assert set(second["sites"]) == {"site-0"}  # and so does round 2
    assert first["weights_sha256"] != second["weights_sha256"]  # round 1 aggregated site-0's update


def test_server_killed_after_round_1_resumes_at_round_2(tmp_path, processes):
    # sites push after training and entries live 2 rounds, so the queue holds round 1's pushes across the
    # restart (with fresh push and max_staleness 0 it is empty between rounds by design)
    fed = start_federation(tmp_path, processes, num_rounds=2,
                           queue_extra="fresh_push = false\nmax_staleness = 2")
    out = fed["out_dir"]
    processes.wait_for("the round-1 checkpoint", lambda: checkpoint_round(out) >= 1, timeout=300,
                       alive=["server", "site-0", "site-1"])
    processes.kill("server")  # SIGKILL to fedcl-server, its SuperLink, queue service and ServerApp
    after_kill = load_checkpoint(out / "checkpoints" / "federation.pt")
    assert after_kill.round == 1
    history_before = read_history(out)

    processes.start("server-restarted", server_argv("run", "--config", str(fed["config"])), env=fed["env"])
    server = processes.procs["server-restarted"]
    processes.wait_for("the resumed run to end", lambda: server.poll() is not None, timeout=400,
                       alive=["site-0", "site-1"])
    assert server.returncode == 0, processes.logs()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 1
    history = read_history(out)
    assert [r["round"] for r in history] == [1, 2]
    assert history[0] == history_before[0] == after_kill.history[0]  # round 1 was not run again
    resumed = history[1]
    # same weights: round 2 sent out exactly the checkpointed global model
    assert resumed["weights_sha256"] == state_sha256(after_kill.state_dict)
    # same queue: the restarted queue service restored its snapshot (round 1's pushes included)
    assert _comparable_queue_stats(resumed["queue_at_start"]) == _comparable_queue_stats(
        after_kill.queue["stats"])
    assert after_kill.queue["stats"]["size"] == 128
    assert resumed["sites_ok"] == 2  # both sites rejoined the new SuperLink by themselves
    assert "rejoining" in processes.log("site-0", tail=100_000)
    # same ledgers: whatever the sites had reported survives the restart
    final = find_checkpoint(out / "checkpoints")
    assert final.round == 2
    for site, ledger in after_kill.ledgers.items():
        assert site in final.ledgers and final.ledgers[site].keys() >= ledger.keys()
