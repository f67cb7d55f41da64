"""The round message between ServerApp and ClientApp: what goes out comes back the same, or is refused."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord

from fedcl.wire.protocol import ProtocolError, RoundConfig, parse_site_record, site_record


def _round(**change) -> RoundConfig:
    base = dict(
        round=3, num_rounds=5, model={"arch": "cnn", "in_channels": 1, "width": 8, "proj_dim": 32, "proj_hidden": 64},
        augment={"flip": True, "noise_std": 0.05}, epochs=1, batch_size=64, lr=0.05, momentum=0.9,
        weight_decay=5e-4, temperature=0.2, in_batch_negatives=False, key_encoder="global", num_push=64, seed=7,
        queue_enabled=True, queue_address="queue:50051", queue_tls=True, num_negatives=256, max_staleness=2,
        warmup_rounds=1, privacy={"dpsgd": False, "release": "raw"}, partition={"partition": "iid"}, threads=None,
    )
    base.update(change)
    return RoundConfig(**base)


def test_round_config_survives_a_config_record():
    rc = _round()
    record = rc.to_config_record()
    assert isinstance(record["privacy"], str) and json.loads(record["privacy"]) == rc.privacy
    assert "threads" not in record  # None is absence
    assert RoundConfig.from_config_record(record) == rc
    assert RoundConfig.from_config_record(_round(threads=2).to_config_record()).threads == 2
    assert RoundConfig.from_config_record(_round(rounds_per_epoch=4).to_config_record()).rounds_per_epoch == 4
    assert RoundConfig.from_config_record(_round(persist_optimizer=True).to_config_record()).persist_optimizer
    older = dict(rc.to_config_record())
    del older["rounds_per_epoch"], older["persist_optimizer"]  # an older server
    back = RoundConfig.from_config_record(ConfigRecord(older))
    assert back.rounds_per_epoch == 1 and back.persist_optimizer is False


@pytest.mark.parametrize(("rnd", "warmup", "enabled", "k", "expected"), [
    (1, 1, True, 256, False),  # warm-up: the queue is still empty of other sites' keys
    (2, 1, True, 256, True),
    (2, 1, False, 256, False),
    (2, 1, True, 0, False),
    (1, 0, True, 256, True),
])
def test_queue_negatives_only_after_warm_up(rnd, warmup, enabled, k, expected):
    rc = _round(round=rnd, warmup_rounds=warmup, queue_enabled=enabled, num_negatives=k, in_batch_negatives=True)
    assert rc.use_queue_negatives is expected


def test_without_in_batch_negatives_there_is_no_warm_up():
    # DP-SGD: a warm-up round would have no negatives at all (zero loss, budget spent on noise)
    rc = _round(round=1, warmup_rounds=2, in_batch_negatives=False)
    assert rc.use_queue_negatives
    assert rc.release_phase is False  # fresh_push is off in this round config
    assert _round(round=1, warmup_rounds=2, in_batch_negatives=False, fresh_push=True).release_phase


@pytest.mark.parametrize(("key", "value", "message"), [
    ("epochs", 1.5, "epochs"),
    ("batch_size", -1, "batch_size"),
    ("in_batch_negatives", 1, "in_batch_negatives"),
    ("key_encoder", "momentum", "key_encoder"),
    ("optimizer", "lbfgs", "optimizer"),
    ("lr", "fast", "lr"),
    ("privacy", "{not json", "privacy"),
    ("model", "[1, 2]", "model"),
    ("rounds_per_epoch", 0, "rounds_per_epoch"),
    ("rounds_per_epoch", 1.5, "rounds_per_epoch"),
    ("persist_optimizer", "yes", "persist_optimizer"),
])
def test_bad_round_settings_are_refused_with_the_key_named(key, value, message):
    raw = dict(_round().to_config_record())
    raw[key] = value
    with pytest.raises(ProtocolError, match=message):
        RoundConfig.from_config_record(ConfigRecord(raw))


def test_a_missing_setting_is_named():
    raw = dict(_round().to_config_record())
    del raw["temperature"]
    with pytest.raises(ProtocolError, match="temperature"):
        RoundConfig.from_config_record(ConfigRecord(raw))


def test_site_record_round_trip_and_garbage():
    assert parse_site_record(site_record(site_id="site-a", ledger={"epsilon": 1.5})) == ("site-a", {"epsilon": 1.5})
    assert parse_site_record(None) == (None, {})
    assert parse_site_record(ConfigRecord({"site-id": "x", "ledger": "{oops"})) == ("x", {})
