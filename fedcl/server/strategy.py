"""Pick any of Flower's message-API strategies (``flwr.serverapp.strategy``) by name."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy import Strategy


class StrategyError(ValueError):
    """The configured strategy cannot be built; the message lists what would work."""


def available_strategies() -> list[str]:
    return sorted(
        name for name in getattr(flwr_strategies, "__all__", dir(flwr_strategies))
        if inspect.isclass(getattr(flwr_strategies, name, None))
        and issubclass(getattr(flwr_strategies, name), Strategy)
        and not inspect.isabstract(getattr(flwr_strategies, name))
    )


def build_strategy(
    name: str,
    *,
    fraction_train: float,
    min_train_nodes: int,
    min_available_nodes: int,
    fraction_evaluate: float = 0.0,
    min_evaluate_nodes: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Strategy:
    """Instantiate ``flwr.serverapp.strategy.<name>`` with the sampling settings it accepts.

    Weights are averaged by the ``num-examples`` metric (FedAvg's default), which every fedcl site
    reports. ``extra`` passes strategy-specific keyword arguments (e.g. ``proximal_mu`` for FedProx).
    """
    names = available_strategies()
    cls = getattr(flwr_strategies, name, None) if name in names else None
    if cls is None:
        raise StrategyError(
            f"unknown strategy {name!r}; federation.strategy can be one of: {', '.join(names)}")
    wanted: dict[str, Any] = {
        "fraction_train": fraction_train,
        "min_train_nodes": min_train_nodes,
        "min_available_nodes": min_available_nodes,
        "fraction_evaluate": fraction_evaluate,
        "min_evaluate_nodes": min_train_nodes if min_evaluate_nodes is None else min_evaluate_nodes,
        "weighted_by_key": "num-examples",
    }
    wanted.update(extra or {})
    params = inspect.signature(cls.__init__).parameters
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in wanted.items() if k in params or accepts_kwargs}
    unknown = set(extra or {}) - set(kwargs)
    if unknown:
        raise StrategyError(f"strategy {name} takes no argument(s) {sorted(unknown)}")
    missing = [
        p.name for p in params.values()
        if p.name != "self" and p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in kwargs
    ]
    if missing:
        raise StrategyError(f"strategy {name} needs argument(s) {missing}, which fedcl's config does not set")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"strategy {name} rejected its settings: {exc}") from None


# What Flower's strategies carry from one round to the next: the adaptive optimizers' moments
# (FedAdam, FedYogi, FedAdagrad: ``m_t``, ``v_t``, dicts of arrays) and FedAvgM's momentum (a list of
# arrays). The weights the strategy started the round from are set again by every configure_train.
STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The round-to-round state of ``strategy`` as tensors, for the checkpoint (empty for FedAvg)."""
    state: dict[str, Any] = {}
    for name in STATE_ATTRIBUTES:
        value = getattr(strategy, name, None)
        if value is None:
            continue
        if isinstance(value, dict):
            state[name] = {str(k): torch.from_numpy(np.array(v)) for k, v in value.items()}
        else:
            state[name] = [torch.from_numpy(np.array(v)) for v in value]
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put ``strategy_state``'s output back into a freshly built strategy of the same class."""
    for name, value in state.items():
        if name not in STATE_ATTRIBUTES or not hasattr(strategy, name):
            raise StrategyError(
                f"the checkpoint holds strategy state {name!r} that {type(strategy).__name__} does not "
                "have; resume with the strategy that wrote it, or start afresh in another output folder")
        if isinstance(value, dict):
            setattr(strategy, name, {k: v.numpy() for k, v in value.items()})
        else:
            setattr(strategy, name, [v.numpy() for v in value])
