"""Any of Flower's message-API strategies by name, with fedcl's sampling settings."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx

from fedcl.server.strategy import StrategyError, available_strategies, build_strategy

SAMPLING = dict(fraction_train=0.5, min_train_nodes=3, min_available_nodes=4, fraction_evaluate=0.0)


def test_fedavg_gets_the_sampling_settings():
    s = build_strategy("FedAvg", **SAMPLING)
    assert isinstance(s, FedAvg)
    assert (s.fraction_train, s.min_train_nodes, s.min_available_nodes) == (0.5, 3, 4)
    assert s.weighted_by_key == "num-examples"


def test_strategy_specific_arguments():
    s = build_strategy("FedProx", **SAMPLING, extra={"proximal_mu": 0.1})
    assert isinstance(s, FedProx) and s.proximal_mu == 0.1
    with pytest.raises(StrategyError, match="takes no argument"):
        build_strategy("FedAvg", **SAMPLING, extra={"proximal_mu": 0.1})


def test_unknown_and_unbuildable_strategies_are_explained():
    assert {"FedAvg", "FedAdam", "FedMedian", "Krum"} <= set(available_strategies())
    with pytest.raises(StrategyError, match="FedAvg"):
        build_strategy("FedAverage", **SAMPLING)
    with pytest.raises(StrategyError, match="needs argument"):  # a wrapper around another strategy
        build_strategy("DifferentialPrivacyClientSideFixedClipping", **SAMPLING)


STATEFUL = [("FedAvgM", {"server_momentum": 0.9}), ("FedAdam", {"eta": 1e-2, "tau": 1e-6}),
            ("FedYogi", {"eta": 1e-2, "tau": 1e-6}), ("FedAdagrad", {"eta": 1e-2, "tau": 1e-6})]


def _round(strategy, rnd: int, weights: ArrayRecord, site_weights: list[dict]) -> ArrayRecord:
    """configure_train then aggregate_train of one round, with the sites' replies ``site_weights``."""
    from fedcl.sim.inprocess import InProcessGrid, simulation_node_configs, task_identity

    with task_identity(run_id=1):
        grid = InProcessGrid(lambda message, context: None, simulation_node_configs(2))
        sent = list(strategy.configure_train(rnd, weights, ConfigRecord({"round": rnd}), grid))
        counts = MetricRecord({"num-examples": 10})
        replies = [Message(RecordDict({"arrays": ArrayRecord(w), "metrics": counts}), reply_to=m)
                   for m, w in zip(sent, site_weights, strict=True)]
        new, _ = strategy.aggregate_train(rnd, replies)
    return new


@pytest.mark.parametrize(("name", "kwargs"), STATEFUL)
def test_a_strategys_state_survives_the_checkpoint(tmp_path, name, kwargs):
    """A resumed server continues with the momentum or moments the killed one had: round 2 after a
    checkpoint gives the same weights as round 2 without one, and a strategy built afresh does not."""
    from fedcl.server.checkpoint import FederationCheckpoint, load_checkpoint, save_checkpoint
    from fedcl.server.strategy import restore_strategy_state, strategy_state

    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    sites = [[{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in start.items()} for _ in range(2)]
             for _ in range(2)]
    build = dict(SAMPLING, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2, extra=kwargs)
    killed = build_strategy(name, **build)
    after_1 = _round(killed, 1, ArrayRecord(start), sites[0])
    path = save_checkpoint(tmp_path / "federation.pt", FederationCheckpoint(
        round=1, state_dict=dict(start), model_spec={}, strategy=name, strategy_state=strategy_state(killed)))
    resumed, fresh = build_strategy(name, **build), build_strategy(name, **build)
    restore_strategy_state(resumed, load_checkpoint(path).strategy_state)

    went_on = _round(killed, 2, after_1, sites[1]).to_torch_state_dict()
    after_resume = _round(resumed, 2, after_1, sites[1]).to_torch_state_dict()
    without_state = _round(fresh, 2, after_1, sites[1]).to_torch_state_dict()
    for k in start:
        assert torch.equal(after_resume[k], went_on[k]), k
    assert any(not torch.allclose(without_state[k], went_on[k]) for k in start)


def test_fedavg_has_no_state_and_a_foreign_state_is_refused():
    from fedcl.server.strategy import restore_strategy_state, strategy_state

    assert strategy_state(build_strategy("FedAvg", **SAMPLING)) == {}
    with pytest.raises(StrategyError, match="does not have"):
        restore_strategy_state(build_strategy("FedAvg", **SAMPLING), {"m_t": {"w": torch.zeros(1)}})
