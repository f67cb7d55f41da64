"""Any of Flower's message-API strategies by name, with fedcl's sampling settings."""

from __future__ import annotations

import pytest
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
