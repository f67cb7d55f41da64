"""Federation checkpoints: atomic writes, weights_only loading, clear errors."""

from __future__ import annotations

import math
import os

import pytest
import torch

from fedcl.server.checkpoint import (
    CheckpointError,
    FederationCheckpoint,
    checkpoint_path,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def _ckpt(rnd=3) -> FederationCheckpoint:
    return FederationCheckpoint(
        round=rnd, state_dict={"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)},
        model_spec={"arch": "cnn", "in_channels": 1, "width": 8, "proj_dim": 16, "proj_hidden": 32},
        queue={"stats": {"size": 40, "per_site": {"a": 20, "b": 20}, "oldest_round": None},
               "snapshot_sha256": "ab"},
        ledgers={"a": {"epsilon": 1.5, "channels": {"dpsgd": {"dp": True}}}},
        history=[{"round": 1, "loss": 5.0, "knn": None, "epsilon": float("inf")}], config_json='{"x": 1}',
        strategy="FedProx",
    )


def test_round_trip(tmp_path):
    path = save_checkpoint(checkpoint_path(tmp_path), _ckpt())
    got = load_checkpoint(path)
    assert got.round == 3 and got.strategy == "FedProx" and got.config_json == '{"x": 1}'
    assert torch.equal(got.state_dict["w"], _ckpt().state_dict["w"])
    assert got.queue == _ckpt().queue and got.ledgers == _ckpt().ledgers
    assert math.isinf(got.history[0]["epsilon"]) and got.history[0]["knn"] is None
    assert find_checkpoint(tmp_path).round == 3
    assert find_checkpoint(tmp_path / "none") is None


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = checkpoint_path(tmp_path)
    save_checkpoint(path, _ckpt(1))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _ckpt(2))
    monkeypatch.undo()
    assert load_checkpoint(path).round == 1  # the old checkpoint is intact
    assert os.listdir(tmp_path) == [path.name]


def test_non_plain_values_are_refused_at_save(tmp_path):
    bad = _ckpt()
    bad.history = [{"round": 1, "thing": object()}]
    with pytest.raises(TypeError, match="plain"):
        save_checkpoint(checkpoint_path(tmp_path), bad)


def test_unusable_files_say_what_to_do(tmp_path):
    path = checkpoint_path(tmp_path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="move it away"):
        load_checkpoint(path)
    torch.save({"format": "something-else"}, path)
    with pytest.raises(CheckpointError, match="not a fedcl federation checkpoint"):
        load_checkpoint(path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": "fedcl-federation/1", "round": Evil()}, path)
    with pytest.raises(CheckpointError):  # weights_only: no arbitrary objects are unpickled
        load_checkpoint(path)
