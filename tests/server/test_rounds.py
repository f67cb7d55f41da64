"""The ServerApp's round loop in one process: ``fedcl.sim.inprocess.InProcessGrid`` hands each message
to the ClientApp's handlers, the queue service runs on loopback. Rounds, failures, checkpoints, resume."""

from __future__ import annotations

import contextlib
import secrets

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict

from fedcl.client.app import SimulatedSites, make_client_app, train_handler
from fedcl.config import load_config
from fedcl.queue import EmbeddingQueue
from fedcl.server.app import FederationError, QueueLink, run_federation, state_sha256
from fedcl.server.checkpoint import find_checkpoint
from fedcl.server.queue_service import ServeSettings, start_queue_server
from fedcl.sim.inprocess import FIRST_NODE_ID, InProcessGrid, simulation_node_configs, task_identity

TINY = [
    "data.name=synthetic", "data.num_sites=2", "data.partition=iid", "data.synthetic_images=200",
    "data.eval_max_images=100", "data.train_max_images=200", "model.width=4", "model.proj_hidden=32",
    "model.proj_dim=16", "train.batch_size=50", "train.num_push=20", "train.threads=1",
    "queue.num_negatives=64", "queue.warmup_rounds=1",
]
NODES = simulation_node_configs(2)  # node FIRST_NODE_ID + i is site i, as under Flower's simulation
SITE0, SITE1 = FIRST_NODE_ID, FIRST_NODE_ID + 1


def _grid(simulated: SimulatedSites, *, broken: set[int] = frozenset(), unavailable: set[int] = frozenset(),
          grid=InProcessGrid) -> InProcessGrid:
    """The shipped ClientApp on two nodes. A node in ``broken`` crashes on every message; for a node in
    ``unavailable`` the reply is what Flower answers when a node's heartbeat expires: an error reply
    that Flower's own node (id 1) writes, not the site."""
    client_app = make_client_app(simulated=simulated)

    def app(message: Message, context: Context) -> Message:
        if context.node_id in broken:
            raise RuntimeError(f"site on node {context.node_id} crashed")
        if context.node_id in unavailable:
            reply = Message(Error(code=3, reason="Node Unavailable"), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = 1
            return reply
        return client_app(message=message, context=context)

    return grid(app, NODES)


@pytest.fixture
def federation(tmp_path):
    cfg = load_config(None, TINY)
    tokens = {f"site-{i}": secrets.token_urlsafe(16) for i in range(2)}
    coordinator = secrets.token_urlsafe(16)
    queue = EmbeddingQueue(dim=16, capacity=1000, per_site_quota=500, max_staleness=2, dtype="float32")
    server = start_queue_server(queue, ServeSettings(host="127.0.0.1", port=0, site_tokens=tokens,
                                                     coordinator_token=coordinator,
                                                     snapshot_path=tmp_path / "queue-snapshot.npz",
                                                     max_message_bytes=1 << 20))
    link = QueueLink(address=f"127.0.0.1:{server.port}", coordinator_token=coordinator,
                     snapshot_path=tmp_path / "queue-snapshot.npz")
    simulated = SimulatedSites(config=cfg, site_tokens=tokens, threads=1)
    _running_servers.append(server)
    with task_identity(run_id=1):  # who sends: Flower reads it for each message the ServerApp creates
        yield cfg, link, simulated, queue
    _running_servers.remove(server)
    server.stop(grace=0.5)


_running_servers: list = []  # the federation fixture's queue server, for a test that kills it


def _with_rounds(cfg, n):
    return cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"num_rounds": n})})


def _with(cfg, section, **values):
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})


def test_rounds_checkpoint_and_resume(tmp_path, federation):
    cfg, link, simulated, queue = federation
    out = tmp_path / "out"
    grid = _grid(simulated)
    first = run_federation(grid, config=_with_rounds(cfg, 2), out_dir=out, queue=link)
    assert [r["round"] for r in first.history] == [1, 2]
    assert first.history[0]["negatives_used"] == 0 and first.history[0]["pushed"] == 0  # warm-up: no release
    # round 2 (fresh push): a query message first; each site pushes 20 embeddings of the global model
    # it received, then trains on the other site's 20 (never its own)
    kinds = [(m.metadata.message_type, m.content.config_records["config"]["round"]) for m in grid.sent]
    assert kinds == [("train", 1), ("train", 1), ("query", 2), ("query", 2), ("train", 2), ("train", 2),
                     ("evaluate", 2), ("evaluate", 2)]
    query, train = grid.sent[2], grid.sent[4]
    assert query.content.array_records["arrays"].keys() == train.content.array_records["arrays"].keys()
    for key in query.content.array_records["arrays"].keys():  # the release encodes with the round's weights
        q_arr = query.content.array_records["arrays"][key].numpy()
        assert (q_arr == train.content.array_records["arrays"][key].numpy()).all()
    assert [m["negatives-used"] for m in first.history[1]["sites"].values()] == [20, 20]
    assert first.history[1]["release_phase"] == {"mode": "raw", "sites_ok": 2, "sites_failed": 0,
                                                 "pushed": 40}
    ckpt = find_checkpoint(out / "checkpoints")
    assert ckpt.round == 2 and ckpt.queue["stats"]["current_round"] == 3  # advanced past the round
    assert ckpt.queue["snapshot_sha256"] is not None
    assert len(queue) == 40 and queue.stats()["newest_round"] == 2  # only the release phase pushed

    resumed = run_federation(_grid(simulated), config=_with_rounds(cfg, 3), out_dir=out, queue=link)
    assert resumed.resumed_from == 2
    assert [r["round"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == first.history
    assert resumed.history[2]["weights_sha256"] == state_sha256(ckpt.state_dict)
    assert resumed.history[2]["queue_at_start"]["size"] == 40
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # rewritten from the checkpoint, then appended


def test_without_fresh_push_sites_push_after_training(tmp_path, federation):
    cfg, link, simulated, queue = federation
    cfg = _with(_with_rounds(cfg, 2), "queue", fresh_push=False, max_staleness=2)
    grid = _grid(simulated)
    result = run_federation(grid, config=cfg, out_dir=tmp_path / "out", queue=link)
    assert all(m.metadata.message_type != "query" for m in grid.sent)
    # round 2: the site sampled first draws the other's 20 round-1 embeddings; the second also sees the
    # 20 the first pushed a moment ago in this same round (the queue serves entries of the current round)
    assert sorted(m["negatives-used"] for m in result.history[1]["sites"].values()) == [20, 40]
    assert len(queue) == 80  # 2 sites x 20 embeddings x 2 rounds


def test_fresh_push_is_entered_in_each_sites_ledger(tmp_path, federation):
    cfg, link, simulated, _ = federation
    simulated = SimulatedSites(config=simulated.config, site_tokens=simulated.site_tokens, threads=1,
                               state_root=tmp_path / "sites")
    run_federation(_grid(simulated), config=_with_rounds(cfg, 2), out_dir=tmp_path / "out", queue=link)
    import json

    ledger = json.loads((tmp_path / "sites" / "site-0" / "ledger-site-0.json").read_text())
    # the release of round 2 (20 raw embeddings, not DP) before round 2's training; nothing in warm-up
    assert [(e["round"], e["channel"], e["mode"], e["steps"]) for e in ledger["events"]] == [
        (1, "model_updates", "nonprivate", 1), (2, "embeddings", "raw", 20),
        (2, "model_updates", "nonprivate", 1)]


def test_prototypes_are_merged_by_the_server_from_noisy_sums(tmp_path, federation):
    cfg, link, simulated, queue = federation
    cfg = _with(_with_rounds(cfg, 2), "privacy", release="prototypes", num_prototypes=8,
                release_sample_rate=1.0, release_noise_multiplier=0.5, prototype_min_count=1.0)
    simulated = SimulatedSites(config=simulated.config, site_tokens=simulated.site_tokens, threads=1,
                               state_root=tmp_path / "sites")  # ledgers persist between the phases
    grid = _grid(simulated)
    result = run_federation(grid, config=cfg, out_dir=tmp_path / "out", queue=link)
    queries = [m for m in grid.sent if m.metadata.message_type == "query"]
    assert len(queries) == 2 and queries[0].content.array_records["prototypes"][
        "prototypes"].numpy().shape == (8, 16)
    info = result.history[1]["release_phase"]
    assert info["mode"] == "prototypes" and info["sites_ok"] == 2 and info["pushed"] == 8
    # the queue holds the server's 8 merged prototypes (site "prototypes"), unit norm, and no site's raw
    # embedding
    assert queue.stats()["per_site"] == {"prototypes": 8}
    assert [m["negatives-used"] for m in result.history[1]["sites"].values()] == [8, 8]
    ckpt = find_checkpoint(tmp_path / "out" / "checkpoints")
    merged = torch.tensor(ckpt.queue["release"]["prototypes"])
    assert merged.shape == (8, 16) and torch.allclose(merged.norm(dim=1), torch.ones(8), atol=1e-5)
    for e in result.history[1]["sites"].values():
        assert e["epsilon-accounted"] > 0  # the prototype release is accounted


def test_public_mode_negatives_are_the_servers_reference_set(tmp_path, federation):
    cfg, link, simulated, queue = federation
    cfg = _with(_with(_with_rounds(cfg, 2), "privacy", release="public"), "queue", public_images=30)
    grid = _grid(simulated)
    result = run_federation(grid, config=cfg, out_dir=tmp_path / "out", queue=link)
    assert all(m.metadata.message_type != "query" for m in grid.sent)  # nothing asked of the sites
    assert result.history[1]["release_phase"]["pushed"] == 30
    assert queue.stats()["per_site"] == {"public": 30}
    assert [m["negatives-used"] for m in result.history[1]["sites"].values()] == [30, 30]
    assert all(m["epsilon-accounted"] == 0 for m in result.history[1]["sites"].values())


def test_a_failed_site_drops_out_of_its_round_only(tmp_path, federation):
    cfg, link, simulated, _ = federation
    result = run_federation(_grid(simulated, broken={SITE1}), config=_with_rounds(cfg, 1),
                            out_dir=tmp_path / "out", queue=link)
    record = result.history[0]
    assert set(record["sites"]) == {"site-0"} and record["sites_failed"] == 1
    assert "crashed" in record["errors"][0]


def test_a_site_flower_reports_unavailable_is_counted_once_under_its_node(tmp_path, federation):
    cfg, link, simulated, _ = federation
    result = run_federation(_grid(simulated, unavailable={SITE1}), config=_with_rounds(cfg, 1),
                            out_dir=tmp_path / "out", queue=link)
    record = result.history[0]
    assert record["sites_failed"] == 1 and record["errors"] == [f"node {SITE1}: Node Unavailable"]


def test_no_site_completing_a_round_stops_the_run(tmp_path, federation):
    cfg, link, simulated, _ = federation
    with pytest.raises(FederationError, match="no site completed"):
        run_federation(_grid(simulated, broken={SITE0, SITE1}), config=_with_rounds(cfg, 1),
                       out_dir=tmp_path / "out", queue=link)


def test_a_checkpoint_of_another_model_is_not_resumed(tmp_path, federation):
    cfg, link, simulated, _ = federation
    out = tmp_path / "out"
    run_federation(_grid(simulated), config=_with_rounds(cfg, 1), out_dir=out, queue=link)
    wider = cfg.model_copy(update={"model": cfg.model.model_copy(update={"width": 8})})
    with pytest.raises(FederationError, match="move the checkpoint folder away"):
        run_federation(_grid(simulated), config=_with_rounds(wider, 2), out_dir=out, queue=link)


def test_a_checkpoint_of_other_run_settings_is_not_resumed_and_stays_as_it_was(tmp_path, federation):
    """A finished run's folder, rerun with other training settings (here a new learning rate and
    the queue off), is refused: resuming would report the old run's rounds under the new
    settings. More rounds are still a resume."""
    cfg, link, simulated, _ = federation
    out = tmp_path / "out"
    run_federation(_grid(simulated), config=_with_rounds(cfg, 1), out_dir=out, queue=link)
    before = (out / "metrics.jsonl").read_text()
    other = _with(_with(_with_rounds(cfg, 2), "train", lr=cfg.train.lr * 2), "queue", enabled=False)
    changed = r"other settings \(train\.lr: [0-9.e-]+ -> [0-9.e-]+; queue\.enabled: True -> False\)"
    with pytest.raises(FederationError, match=changed):
        run_federation(_grid(simulated), config=other, out_dir=out, queue=link)
    assert find_checkpoint(out / "checkpoints").round == 1
    assert (out / "metrics.jsonl").read_text() == before
    again = run_federation(_grid(simulated), config=_with_rounds(cfg, 2), out_dir=out, queue=link)
    assert again.resumed_from == 1


def test_config_changes_name_only_run_defining_settings_both_configs_have():
    import json

    from fedcl.config import dump_config
    from fedcl.server.app import config_changes

    cfg = load_config(None, TINY)
    now = dump_config(cfg)
    assert config_changes("", now) == []  # a checkpoint without its config
    assert config_changes(dump_config(_with_rounds(cfg, 99)), now) == []  # more rounds: the same run
    assert config_changes(dump_config(_with(cfg, "train", threads=7, device="cpu")), now) == []  # the machine
    older = json.loads(dump_config(_with(cfg, "train", seed=cfg.train.seed + 1)))
    assert config_changes(json.dumps(older), now) == [f"train.seed: {cfg.train.seed + 1} -> {cfg.train.seed}"]
    del older["train"]["seed"]  # a setting an older fedcl did not write is not a change
    assert config_changes(json.dumps(older), now) == []


def test_a_checkpoint_from_before_queue_temperature_resumes_only_at_its_former_value():
    import json

    from fedcl.config import dump_config
    from fedcl.server.app import config_changes

    cfg = _with(load_config(None, TINY), "train", temperature=0.2, queue_temperature=0.1)
    before = json.loads(dump_config(cfg))
    del before["train"]["queue_temperature"]  # written before 726d6d8: the queue term divided by 0.2
    assert config_changes(json.dumps(before), dump_config(cfg)) == ["train.queue_temperature: 0.2 -> 0.1"]
    same = _with(cfg, "train", queue_temperature=0.2)  # the older run's value: the same run
    assert config_changes(json.dumps(before), dump_config(same)) == []
    del before["train"]  # a checkpoint without the section at all: nothing to compare
    assert config_changes(json.dumps(before), dump_config(cfg)) == []


def test_server_momentum_is_checkpointed_and_resumed(tmp_path, federation, caplog):
    cfg, link, simulated, _ = federation
    cfg = _with(cfg, "federation", strategy="FedAvgM", strategy_kwargs={"server_momentum": 0.9})
    out = tmp_path / "out"
    run_federation(_grid(simulated), config=_with_rounds(cfg, 1), out_dir=out, queue=link)
    # it runs, and the user is told what it did in the benchmarks
    assert "federation.strategy = FedAvgM lost to FedAvg" in caplog.text
    saved = find_checkpoint(out / "checkpoints").strategy_state["momentum_vector"]
    assert saved and all(isinstance(t, torch.Tensor) for t in saved)
    resumed = run_federation(_grid(simulated), config=_with_rounds(cfg, 2), out_dir=out, queue=link)
    assert resumed.resumed_from == 1
    assert len(find_checkpoint(out / "checkpoints").strategy_state["momentum_vector"]) == len(saved)


def test_every_setting_is_either_run_defining_or_allowed_to_change_on_resume():
    from fedcl.config import FedclConfig
    from fedcl.server.app import NOT_RUN_DEFINING, RUN_DEFINING

    for section, field in FedclConfig.model_fields.items():
        names = field.annotation.model_fields
        keys = RUN_DEFINING.get(section, ())
        defining = set(keys or ()) | {
            k for k in names if keys is None and f"{section}.{k}" not in NOT_RUN_DEFINING}
        free = set(names) if section in NOT_RUN_DEFINING else {
            k for k in names if f"{section}.{k}" in NOT_RUN_DEFINING}
        assert defining <= set(names), f"{section}: RUN_DEFINING names unknown {defining - set(names)}"
        assert not defining & free, f"{section}: {sorted(defining & free)} are in both tables"
        assert defining | free == set(names), (
            f"{section}: {sorted(set(names) - defining - free)} in neither RUN_DEFINING nor NOT_RUN_DEFINING")


def test_a_changed_data_split_is_a_change_and_a_moved_data_folder_is_not():
    from fedcl.config import dump_config
    from fedcl.server.app import config_changes

    cfg = load_config(None, TINY)
    now = dump_config(cfg)
    assert config_changes(dump_config(_with(cfg, "data", path="/elsewhere", eval_max_images=7)), now) == []
    assert config_changes(dump_config(_with(cfg, "data", seed=cfg.data.seed + 1)), now) == [
        f"data.seed: {cfg.data.seed + 1} -> {cfg.data.seed}"]


def test_weights_that_do_not_fit_are_refused_by_the_site(tmp_path, federation):
    cfg, link, simulated, _ = federation
    from flwr.app import ArrayRecord

    from fedcl.server.app import round_config
    from fedcl.wire.protocol import ProtocolError

    rc = round_config(cfg, rnd=1, model_spec={"arch": "cnn", "in_channels": 1, "width": 4, "proj_dim": 16,
                                              "proj_hidden": 32}, queue=None)
    bad = ArrayRecord({"head.0.weight": torch.zeros(3, 3)})
    msg = Message(content=RecordDict({"arrays": bad, "config": rc.to_config_record()}), message_type="train",
                  dst_node_id=SITE0)
    msg.metadata.__dict__["_message_id"] = "m1"
    ctx = Context(run_id=1, node_id=SITE0, node_config=NODES[0], state=RecordDict(), run_config={})
    with pytest.raises(ProtocolError, match="do not fit"):
        train_handler(msg, ctx, simulated)


def test_audit_round_records_epsilon_per_site_and_failures(tmp_path):
    import json as _json

    from fedcl.server.app import audit_round

    log = tmp_path / "audit.jsonl"
    audit_round(log, rnd=3, sites={"a": {"epsilon": 2.5, "epsilon-accounted": 2.5},
                                   "b": {"epsilon": -1.0, "epsilon-accounted": 0.0}}, errors=["node 7: boom"])
    audit_round(None, rnd=4, sites={"a": {"epsilon": 1.0}}, errors=[])  # no audit log configured: no-op
    lines = [_json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["event"], x.get("site")) for x in lines] == [("round_epsilon", "a"), ("round_epsilon", "b"),
                                                           ("round_site_failed", None)]
    assert lines[0]["epsilon"] == 2.5 and lines[0]["dp_bound"] is True
    assert "epsilon" not in lines[1] and lines[1]["dp_bound"] is False  # never a number for a non-DP site
    assert lines[2]["reason"] == "node 7: boom" and all(x["round"] == 3 for x in lines)


class ConnectingGrid(InProcessGrid):
    """Sites that connect one by one: the first call sees one node, each later call one more."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def get_node_ids(self):
        self.calls += 1
        return list(self.contexts)[: min(self.calls, len(self.contexts))]


def test_round_one_waits_for_min_available_nodes(tmp_path, federation, monkeypatch):
    """FedAvg sizes its sample from the nodes connected when asked; without the wait, round 1
    would train on the first site alone although min_available_nodes names both."""
    cfg, link, simulated, _ = federation
    monkeypatch.setattr("fedcl.server.app.time.sleep", lambda s: None)
    cfg = _with(_with_rounds(cfg, 1), "federation", min_available_nodes=2, min_train_nodes=1,
                fraction_train=1.0)
    grid = _grid(simulated, grid=ConnectingGrid)
    result = run_federation(grid, config=cfg, out_dir=tmp_path / "out", queue=link)
    trained = sorted(m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train")
    assert trained == [SITE0, SITE1]
    assert len(result.history[0]["sites"]) == 2


def test_shorter_rounds_and_kept_optimizers_reach_the_sites_through_the_federation(
    tmp_path, federation, caplog
):
    """train.rounds_per_epoch = 2: every train message says so, and each site trains on half its images;
    train.persist_optimizer: each site's Flower context holds its optimizer state after the run."""
    from fedcl.client.app import OPTIMIZER_KEY, load_site_images
    from fedcl.server.app import round_config
    from fedcl.wire.protocol import RoundConfig

    cfg, link, simulated, _ = federation
    grid = _grid(simulated)
    half = run_federation(grid, config=_with(_with_rounds(cfg, 2), "train", rounds_per_epoch=2,
                                             persist_optimizer=True),
                          out_dir=tmp_path / "b", queue=link)
    assert len(grid.contexts) == 2 and all(
        OPTIMIZER_KEY in context.state for context in grid.contexts.values())
    assert "2 rounds are 1 local epochs per site" in caplog.text  # the user is told what k does to the budget
    assert "lost to FedAvg" not in caplog.text  # FedAvg, the tested strategy: no warning
    sent = [RoundConfig.from_config_record(m.content.config_records["config"]).train for m in grid.sent
            if m.metadata.message_type == "train"]
    assert {t.persist_optimizer for t in sent} == {True}
    rc = round_config(cfg, rnd=1, model_spec={}, queue=None)
    full = [int(load_site_images(simulated.site(node), rc, simulated).shape[0]) for node in NODES]
    assert all(n > 1 for n in full)
    for record in half.history:
        assert [m["num-examples"] for m in record["sites"].values()] == [n // 2 for n in full]
    assert {t.rounds_per_epoch for t in sent} == {2}


def test_a_dp_federation_reports_no_loss_or_alignment_and_its_table_and_plots_cope(
    tmp_path, federation, capsys
):
    """Under DP-SGD the sites send no loss, alignment or uniformity (exact statistics of their images):
    the round records, the table and the plots show them as missing."""
    from fedcl.server.metrics import format_table

    cfg, link, simulated, _ = federation
    cfg = _with(_with(_with_rounds(cfg, 2), "privacy", dpsgd=True, noise_multiplier=1.5, release="public"),
                "train", in_batch_negatives=False)
    cfg = _with(cfg, "queue", public_images=30)
    simulated = SimulatedSites(config=simulated.config, site_tokens=simulated.site_tokens, threads=1,
                               state_root=tmp_path / "sites")  # DP needs each site's ledger to persist
    result = run_federation(_grid(simulated), config=cfg, out_dir=tmp_path / "out", queue=link)
    for record in result.history:
        assert record["sites_ok"] == 2 and record["loss"] is None
        assert all("loss" not in m and m["epsilon"] > 0 for m in record["sites"].values())
    fed_eval = result.history[-1]["fed_eval"]
    assert fed_eval["alignment"] is None and fed_eval["uniformity"] is None and fed_eval["failed"] == 0
    rows = format_table(result.history).splitlines()[2:]
    assert len(rows) == 2 and all(row.split()[1] == "—" for row in rows)  # the loss column
    assert {p.name for p in result.plots} >= {"loss.png", "epsilon.png"}
    # the coordinator's run folder holds no ledger file: fedcl privacy reads the sites' from summary.json
    from fedcl.cli import main

    assert not list((tmp_path / "out").rglob("ledger*.json"))
    assert main(["privacy", str(tmp_path / "out")]) == 0
    report = capsys.readouterr().out
    assert [line for line in report.splitlines() if line.startswith("Privacy report")] == [
        "Privacy report for site 'site-0'", "Privacy report for site 'site-1'"]
    assert report.count("- Model updates -> ") == 2 and report.count(": DP-SGD, ε = ") == 2


def test_rows_a_queue_restart_lost_show_in_the_rounds_metrics(tmp_path, federation):
    cfg, link, simulated, queue = federation
    out = tmp_path / "out"
    first = run_federation(_grid(simulated), config=_with_rounds(cfg, 1), out_dir=out, queue=link)
    assert (first.history[0]["queue_restarts"], first.history[0]["queue_rows_lost"]) == (0, 0)
    from fedcl.wire.queue_client import QueueClient

    with QueueClient(link.address, site_id="site-0", token=simulated.site_tokens["site-0"]) as site:
        site.push(torch.nn.functional.normalize(torch.randn(7, 16), dim=1), round=2,
                  model_version=2)  # acknowledged
    # the service dies without a snapshot (kill -9): here, its gRPC server stops and nothing is saved
    live = next(s for s in _running_servers if s.queue is queue)
    live._server.stop(0).wait()
    live.handlers.journal.close()
    snapshot = tmp_path / "queue-snapshot.npz"
    restarted = start_queue_server(EmbeddingQueue.restore(snapshot), ServeSettings(
        host="127.0.0.1", port=0, site_tokens=simulated.site_tokens, coordinator_token=link.coordinator_token,
        snapshot_path=snapshot, max_message_bytes=1 << 20))
    try:
        link2 = QueueLink(address=f"127.0.0.1:{restarted.port}", coordinator_token=link.coordinator_token,
                          snapshot_path=snapshot)
        resumed = run_federation(_grid(simulated), config=_with_rounds(cfg, 2), out_dir=out,
                                 queue=link2)
    finally:
        restarted.stop(grace=0.5)
    assert (resumed.history[1]["queue_restarts"], resumed.history[1]["queue_rows_lost"]) == (1, 7)
    assert resumed.history[1]["queue"]["rows_lost"] == 7


def test_each_round_is_logged_once_with_the_tables_figures(tmp_path, federation, caplog):
    cfg, link, simulated, _ = federation
    caplog.set_level("INFO", logger="flwr")
    result = run_federation(_grid(simulated), config=_with_rounds(cfg, 2), out_dir=tmp_path / "out",
                            queue=link)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    assert [line.split(" | ")[0] for line in lines] == ["round 1/2", "round 2/2"]
    loss = result.history[1]["loss"]
    assert f"| loss {loss:.3f} |" in lines[1] and str(loss) not in lines[1]  # rounded as in the table
    assert "| sites 2/2 |" in lines[1]


def test_a_killed_site_is_named_by_its_site_id_once_it_has_replied(tmp_path, federation, caplog):
    cfg, link, simulated, _ = federation
    client_app = make_client_app(simulated=simulated)
    trained: list[int] = []

    def app(message: Message, context: Context) -> Message:
        """Site 1 trains in round 1; from round 2 on Flower answers for it that it is unavailable (killed)."""
        if context.node_id == SITE1 and message.metadata.message_type == "train":
            trained.append(context.node_id)
            if len(trained) > 1:
                reply = Message(Error(code=3, reason="Node Unavailable"), reply_to=message)
                reply.metadata.__dict__["_src_node_id"] = 1
                return reply
        return client_app(message=message, context=context)

    result = run_federation(InProcessGrid(app, NODES), config=_with_rounds(cfg, 2), out_dir=tmp_path / "out",
                            queue=link)
    assert result.history[0]["sites_failed"] == 0
    assert result.history[1]["errors"] == [f"site-1 (node {SITE1}): Node Unavailable"]
    assert f"round 2: a site failed: site-1 (node {SITE1}): Node Unavailable" in caplog.text


class _CapturingQueue:
    """A QueueLink stand-in that keeps what the coordinator pushes."""

    def __init__(self) -> None:
        self.pushed: list[torch.Tensor] = []

    @contextlib.contextmanager
    def client(self, *, site_id: str):
        outer = self

        class _Client:
            def push(self, emb, *, round: int, model_version: int) -> int:
                outer.pushed.append(emb.clone())
                return int(emb.shape[0])

        yield _Client()


def test_public_mode_pushes_augmented_views_like_the_sites_do():
    """The public reference set enters the queue as one augmented view per image (a fresh draw each
    round), as the sites' pushes are, not as clean images that an encoder tells apart from the
    augmented queries by the augmentation alone."""
    from fedcl.runtime import make_augment, make_model
    from fedcl.server.app import ReleaseState, public_view_generator, release_phase
    from fedcl.train import encode

    cfg = _with(load_config(None, TINY), "privacy", release="public")
    torch.manual_seed(0)
    model = make_model(cfg.model, in_channels=1)
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    state, queue = ReleaseState(public_images=images), _CapturingQueue()
    for rnd in (1, 2):
        info = release_phase(None, rnd=rnd, train_messages=[], arrays=None, rc=None, cfg=cfg, model=model,
                             queue=queue, state=state, timeout=1.0)
        assert info["pushed"] == 12
    first, second = queue.pushed
    clean = encode(model, images, device=torch.device("cpu"))
    assert not torch.allclose(first, clean, atol=1e-3)  # not the un-augmented images
    assert not torch.allclose(first, second, atol=1e-3)  # a new view each round, the same weights
    again = encode(model, images, device=torch.device("cpu"), augment=make_augment(cfg.augment),
                   generator=public_view_generator(cfg, 1))
    torch.testing.assert_close(first, again)
