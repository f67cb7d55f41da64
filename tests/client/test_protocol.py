"""The round message between ServerApp and ClientApp: what goes out comes back the same, or is refused."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord

from fedcl.config import FedclConfig
from fedcl.wire.protocol import SECTIONS, ProtocolError, RoundConfig, parse_site_record, site_record

MODEL = {"arch": "cnn", "in_channels": 1, "width": 8, "proj_dim": 32, "proj_hidden": 64}


def _round(*, round: int = 3, queue: dict | None = None, **train) -> RoundConfig:
    return RoundConfig(
        round=round, num_rounds=5, queue_address="queue:50051", queue_tls=True, model=MODEL,
        train={"batch_size": 64, "lr": 0.05, "in_batch_negatives": False, "seed": 7, **train},
        queue={"num_negatives": 256, "max_staleness": 2, "fresh_push": False, **(queue or {})},
        augment={"flip": True, "noise_std": 0.05}, privacy={"dpsgd": False, "release": "raw"},
        data={"partition": "iid"},
    )


def test_round_config_survives_a_config_record():
    rc = _round(threads=2, rounds_per_epoch=4, persist_optimizer=True)
    record = rc.to_config_record()
    assert set(record) == {"round", "num_rounds", "queue_address", "queue_tls", "queue_token_dir", *SECTIONS}
    for name in SECTIONS:  # one JSON string per section
        assert json.loads(record[name]) == getattr(rc, name).model_dump(mode="json")
    back = RoundConfig.from_config_record(record)
    assert back == rc
    assert (back.train.threads, back.train.rounds_per_epoch, back.train.persist_optimizer) == (2, 4, True)
    assert RoundConfig.from_config_record(_round().to_config_record()).train.threads is None  # JSON null


def test_a_fedcl_config_section_travels_as_its_site_part_only():
    """The server's sections carry server-only fields (train.device, queue.capacity, data.path, ...);
    the round config keeps the fields of the site's model and drops the rest."""
    cfg = FedclConfig(train={"device": "cpu", "lr": 0.01}, queue={"capacity": 99, "per_site_quota": 9},
                      data={"path": "/server/only"}, privacy={"prototype_min_count": 2.0})
    rc = RoundConfig(round=1, num_rounds=2, **{name: getattr(cfg, name) for name in SECTIONS})
    record = rc.to_config_record()
    for name, section in SECTIONS.items():
        assert type(getattr(rc, name)) is section
        assert set(json.loads(record[name])) == set(section.model_fields)
    assert rc.train.lr == 0.01
    assert (
        "device" not in record["train"]
        and "capacity" not in record["queue"]
        and "/server" not in record["data"])


def test_keys_flower_adds_are_ignored_and_a_missing_key_in_a_section_takes_its_default():
    raw = dict(_round().to_config_record())
    raw["server-round"] = 3  # Flower's strategies add it to every config record
    train = json.loads(raw["train"])
    del train["rounds_per_epoch"], train["persist_optimizer"]  # an older server's section
    raw["train"] = json.dumps(train)
    back = RoundConfig.from_config_record(ConfigRecord(raw))
    assert back.train.rounds_per_epoch == 1 and back.train.persist_optimizer is False
    assert back.train.lr == 0.05


@pytest.mark.parametrize(("rnd", "warmup", "enabled", "k", "expected"), [
    (1, 1, True, 256, False),  # warm-up: the queue is still empty of other sites' keys
    (2, 1, True, 256, True),
    (2, 1, False, 256, False),
    (2, 1, True, 0, False),
    (1, 0, True, 256, True),
])
def test_queue_negatives_only_after_warm_up(rnd, warmup, enabled, k, expected):
    rc = _round(round=rnd, queue={"warmup_rounds": warmup, "enabled": enabled, "num_negatives": k},
                in_batch_negatives=True)
    assert rc.use_queue_negatives is expected


def test_without_in_batch_negatives_there_is_no_warm_up():
    # DP-SGD: a warm-up round would have no negatives at all (zero loss, budget spent on noise)
    rc = _round(round=1, queue={"warmup_rounds": 2}, in_batch_negatives=False)
    assert rc.use_queue_negatives
    assert rc.release_phase is False  # fresh_push is off in this round config
    assert _round(round=1, queue={"warmup_rounds": 2, "fresh_push": True},
                  in_batch_negatives=False).release_phase


def _with(section: str, **change) -> ConfigRecord:
    raw = dict(_round().to_config_record())
    raw[section] = json.dumps({**json.loads(raw[section]), **change})
    return ConfigRecord(raw)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (_with("train", epochs=1.5), r"train\.epochs: .*integer"),
        (_with("train", batch_size=-1), r"train\.batch_size: .*greater than or equal to 1"),
        (_with("train", in_batch_negatives=1),
         r"train\.in_batch_negatives: .*boolean \(got 1\)"),  # strict: no 1
        (_with("train", key_encoder="momentum"), r"train\.key_encoder: .*'global' or 'online'"),
        (_with("train", optimizer="lbfgs"), r"train\.optimizer"),
        (_with("train", lr="fast"), r"train\.lr: .*number"),
        (_with("train", rounds_per_epoch=0), r"train\.rounds_per_epoch"),
        (_with("train", persist_optimizer="yes"), r"train\.persist_optimizer"),
        (_with("queue", max_staleness=-1), r"queue\.max_staleness"),
        (_with("privacy", release="gaussian", release_noise_multiplier=0),
         r"privacy: .*release_noise_multiplier"),
        (_with("model", width=2), r"model\.width"), (_with("augment", blur_prob=2), r"augment\.blur_prob"),
        (_with("data", partition="stripes"), r"data\.partition"),
        (ConfigRecord({**_round().to_config_record(), "privacy": "{not json"}), r"privacy: Invalid JSON"),
        (ConfigRecord({**_round().to_config_record(), "model": "[1, 2]"}), r"model: .*object"),
        (ConfigRecord({**_round().to_config_record(), "train": 5}), r"section 'train' must be a JSON string"),
        (ConfigRecord({**_round().to_config_record(), "round": True}), r"round: .*integer"),
        (ConfigRecord({**_round().to_config_record(), "round": 0}), r"round: .*greater than or equal to 1"),
    ],
)
def test_bad_round_settings_are_refused_in_one_line_naming_the_key(record, message):
    with pytest.raises(ProtocolError, match=message) as err:
        RoundConfig.from_config_record(record)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_an_unknown_key_in_any_section_is_refused_in_one_line(section):
    """A newer server's setting that this site does not know: refused, not silently ignored."""
    with pytest.raises(ProtocolError) as err:
        RoundConfig.from_config_record(_with(section, hard_negatives=8))
    assert str(err.value) == (f"round config refused: {section}.hard_negatives: unknown key; is the server "
                              "running the same fedcl version as this site?")


def test_a_missing_section_or_scalar_is_named():
    for key in ("train", "privacy", "round", "queue_address"):
        raw = dict(_round().to_config_record())
        del raw[key]
        with pytest.raises(ProtocolError, match=f"round config has no '{key}'"):
            RoundConfig.from_config_record(ConfigRecord(raw))


def test_site_record_round_trip_and_garbage():
    assert parse_site_record(site_record(site_id="site-a", ledger={"epsilon": 1.5})) == (
        "site-a", {"epsilon": 1.5})
    assert parse_site_record(None) == (None, {})
    assert parse_site_record(ConfigRecord({"site-id": "x", "ledger": "{oops"})) == ("x", {})
