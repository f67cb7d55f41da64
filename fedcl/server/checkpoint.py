"""Atomic per-round checkpoints of the federation, and resuming from them.

A checkpoint holds what a restarted ServerApp needs to continue at round k + 1 as if nothing had
happened: the global weights (canonical state dict) with the model spec to rebuild them, the
round, the queue's state as the queue service reported it (its own snapshot file holds the
embeddings), the strategy's own round-to-round state (server momentum, adaptive moments), the
per-site privacy-ledger summaries the sites reported, and the metrics history.

Written with ``torch.save`` to a temp file in the same folder, fsync, rename, fsync of the
folder; read with ``torch.load(weights_only=True)`` (tensors and plain containers only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedcl.fileio import atomic_file
from fedcl.models import read_torch_payload

CHECKPOINT_FORMAT = "fedcl-federation/1"
CHECKPOINT_NAME = "federation.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and what to do."""


@dataclass
class FederationCheckpoint:
    round: int  # the last completed round
    state_dict: dict[str, torch.Tensor]  # canonical, CPU
    model_spec: dict[str, Any]  # build_model(**model_spec)
    # {"stats": ..., "snapshot_path": ..., "snapshot_sha256": ...}
    queue: dict[str, Any] = field(default_factory=dict)
    ledgers: dict[str, dict[str, Any]] = field(default_factory=dict)  # site id -> ledger summary
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per round, as in metrics.jsonl
    config_json: str = ""  # the effective FedclConfig (fedcl.config.dump_config)
    strategy: str = "FedAvg"
    # the strategy's round-to-round state (fedcl.server.strategy.strategy_state): server momentum,
    # adaptive moments; empty for FedAvg
    strategy_state: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "round": int(self.round),
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.state_dict.items()},
            "model_spec": dict(self.model_spec),
            "queue": _plain(self.queue),
            "ledgers": _plain(self.ledgers),
            "history": _plain(self.history),
            "config_json": self.config_json,
            "strategy": self.strategy,
            "strategy_state": self.strategy_state,
        }


def _plain(value: Any) -> Any:
    """Plain containers and scalars only, so that weights_only loading accepts them."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"checkpoint field of type {type(value).__name__} is not a plain value")


def save_checkpoint(path: Path, checkpoint: FederationCheckpoint) -> Path:
    """Write ``checkpoint`` to ``path`` atomically: a crash leaves the old file or the new one, never half."""
    with atomic_file(path) as f:
        torch.save(checkpoint.to_payload(), f)
    return Path(path)


def load_checkpoint(path: Path) -> FederationCheckpoint:
    try:
        payload = read_torch_payload(path, fmt=CHECKPOINT_FORMAT, kind="federation",
                                     fix="; move it away to start afresh")
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    try:
        return FederationCheckpoint(
            round=int(payload["round"]),
            state_dict=dict(payload["state_dict"]),
            model_spec=dict(payload["model_spec"]),
            queue=dict(payload.get("queue", {})),
            ledgers=dict(payload.get("ledgers", {})),
            history=list(payload.get("history", [])),
            config_json=str(payload.get("config_json", "")),
            strategy=str(payload.get("strategy", "FedAvg")),
            strategy_state=dict(payload.get("strategy_state", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} lacks a field ({exc}); move it away to start afresh") from None


def checkpoint_path(checkpoint_dir: Path) -> Path:
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def find_checkpoint(checkpoint_dir: Path) -> FederationCheckpoint | None:
    """The checkpoint to resume from, or None when the folder holds none."""
    path = checkpoint_path(checkpoint_dir)
    return load_checkpoint(path) if path.exists() else None
