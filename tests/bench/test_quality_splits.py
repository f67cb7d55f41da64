"""bench/quality.py's site splits hold the classes they promise (on synthetic 10-class data)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not an installed package

from bench.quality import Data  # noqa: E402
from fedcl.data import make_synthetic  # noqa: E402


@pytest.fixture(scope="module")
def data():
    d = Data.__new__(Data)  # the Fashion-MNIST files are not needed to check the partition
    d.root = Path("/nonexistent")  # named in the shipped data config; nothing is loaded from it
    d.train = make_synthetic(num_images=1200, num_classes=10, seed=0)
    d.test = make_synthetic(num_images=100, num_classes=10, seed=1)
    return d


@pytest.mark.parametrize("split,sites,per_site", [("pathological", 5, 2), ("pathological1", 10, 1)])
def test_pathological_splits_give_each_site_its_number_of_classes(data, split, sites, per_site):
    out = data.setup(split=split, seed=0, num_sites=sites, images_per_site=50, test_images=50)
    assert [len(c) for c in out["site_classes"]] == [per_site] * sites
    held = sorted(c for classes in out["site_classes"] for c in classes)
    assert held == sorted(list(range(10)) * (sites * per_site // 10))  # every class, equally often
    assert all(s.shape[0] == 50 for s in out["sites"])


MAIN_TABLE = (
    "--splits pathological,dirichlet0.1 --seeds 0,1,2 --rounds 6 --local-epochs 1 --images-per-site 1000 "
    "--width 16 --test-images 2000 --batch-size 64 --lr 3e-4 --threads 1").split()


def test_cache_key_names_the_shipped_runner_and_every_recipe_option():
    """Rows of the former bench/fedsim.py runner (main table key 055a4d29745c, 20-epoch table
    603676aa2fb5) are not evidence for the shipped federation: the new path must not reuse them. The
    recipe options still change the key."""
    from bench.quality import config_key, parse_args, run_config

    main = config_key(run_config(parse_args(MAIN_TABLE)))
    assert main not in ("055a4d29745c", "603676aa2fb5")
    assert run_config(parse_args(MAIN_TABLE))["runner"] == "shipped-federation-inprocess/1"
    keys = {config_key(run_config(parse_args(MAIN_TABLE + extra)))
            for extra in (["--rounds-per-epoch", "2"], ["--persist-optimizer"], ["--rounds", "12"])}
    assert len(keys) == 3 and main not in keys
    assert main == config_key(run_config(parse_args(MAIN_TABLE)))  # stable across calls


def test_rounds_per_epoch_must_divide_the_epochs(capsys, tmp_path):
    from bench.quality import main

    assert main(MAIN_TABLE + ["--rounds", "3", "--rounds-per-epoch", "2", "--out", str(tmp_path)]) == 2
    assert "must be a multiple of --rounds-per-epoch" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before anything was written




def test_cached_only_with_an_empty_cache_writes_nothing(capsys, tmp_path):
    """Rows cached by the former runner no longer match: tabulating them must not replace the tables."""
    from bench.quality import main

    assert main(MAIN_TABLE + ["--cached-only", "--out", str(tmp_path)]) == 2
    assert "nothing to tabulate" in capsys.readouterr().err
    assert not list(tmp_path.glob("quality*"))


def test_each_row_is_keyed_by_the_recipe_fields_it_reads():
    """A queue setting retrains the queue's rows only; the training recipe misses the untrained rows."""
    from bench.quality import parse_args, row_key, run_config

    def keys(extra: list[str]) -> dict[str, str]:
        cfg = run_config(parse_args(MAIN_TABLE + extra))
        return {m: row_key(cfg, m) for m in ("pixels", "random", "central", "local", "fedsimclr",
                                             "fedcl_noqueue", "fedcl", "fedcl_dp8", "fedcl_prototypes")}

    base = keys([])
    # untrained; central and local (no queue, trained); then each federation by its own definition
    assert base["pixels"] == base["random"] and base["central"] == base["local"]
    assert len(set(base.values())) == 2 + 5
    for extra in (["--num-push", "128"], ["--max-staleness", "3"], ["--num-negatives", "1024"]):
        changed = {m for m, k in keys(extra).items() if k != base[m]}
        assert changed == {"fedcl", "fedcl_dp8", "fedcl_prototypes"}, extra
    for extra in (["--rounds", "12"], ["--lr", "1e-3"], ["--rounds-per-epoch", "2"]):
        changed = {m for m, k in keys(extra).items() if k != base[m]}
        assert changed == set(base) - {"pixels", "random"}, extra
    changed = {m for m, k in keys(["--width", "8"]).items() if k != base[m]}
    assert changed == set(base)  # the encoder reaches every row (pixels included: over-keying is safe)


def test_queue_temperature_keys_the_queue_rows_only_and_at_the_temperature_keeps_the_former_keys():
    """Tables trained before train.queue_temperature had the queue term at --temperature: passing that
    value keeps their keys; another value retrains the rows whose loss has a queue term."""
    from bench.quality import parse_args, row_key, run_config

    def keys(extra: list[str]) -> dict[str, str]:
        cfg = run_config(parse_args(MAIN_TABLE + extra))
        return {m: row_key(cfg, m) for m in ("pixels", "central", "local", "fedsimclr", "fedcl_noqueue",
                                             "fedcl", "fedcl_dp8", "fedcl_public", "fedcl_prototypes")}

    assert "queue_temperature" not in run_config(parse_args(MAIN_TABLE + ["--queue-temperature", "0.2"]))
    former, default = keys(["--queue-temperature", "0.2"]), keys([])
    assert run_config(parse_args(MAIN_TABLE))["queue_temperature"] == 0.1  # the shipped default
    changed = {m for m in former if former[m] != default[m]}
    assert changed == {"fedcl", "fedcl_dp8", "fedcl_public", "fedcl_prototypes"}
    assert keys(["--queue-temperature", "0.1", "--temperature", "0.1"])["fedcl"] not in (former["fedcl"],
                                                                                          default["fedcl"])


def test_a_changed_preset_or_loss_gets_a_new_cache_key(monkeypatch):
    """A run cached under one definition of a method is not reused for another one."""
    import dataclasses

    import bench.quality as q

    cfg = q.run_config(q.parse_args(MAIN_TABLE))
    before = q.row_key(cfg, "fedcl")
    monkeypatch.setitem(q.METHODS, "fedcl", dataclasses.replace(q.METHODS["fedcl"], max_staleness=2))
    assert q.row_key(cfg, "fedcl") != before
    monkeypatch.setitem(q.METHODS, "fedcl", dataclasses.replace(q.METHODS["fedcl"], max_staleness=0))
    assert q.row_key(cfg, "fedcl") == before
    monkeypatch.setattr("fedcl.train.loss_name", lambda **kw: "another loss")
    assert q.row_key(cfg, "fedcl") != before


def test_max_staleness_sets_the_fresh_push_rows_only():
    from bench.quality import METHODS, federation_config, parse_args, run_config

    cfg = run_config(parse_args(MAIN_TABLE + ["--max-staleness", "3"]))
    staleness = {m: federation_config(METHODS[m], cfg, split="pathological", seed=0,
                                      data_root=Path("/x")).queue.max_staleness
                 for m in ("fedcl", "fedcl_dp3", "fedcl_prototypes", "fedcl_public")}
    assert staleness == {"fedcl": 3, "fedcl_dp3": 3, "fedcl_prototypes": 3, "fedcl_public": 3}
    noqueue = federation_config(METHODS["fedcl_noqueue"], cfg, split="pathological", seed=0,
                                data_root=Path("/x"))
    assert not noqueue.queue.enabled and noqueue.queue.max_staleness == METHODS["fedcl_noqueue"].max_staleness
    default = run_config(parse_args(MAIN_TABLE))
    assert "max_staleness" not in default  # so that the rows cached before the option keep their key
    assert federation_config(METHODS["fedcl"], default, split="pathological", seed=0,
                             data_root=Path("/x")).queue.max_staleness == 0


def test_server_momentum_sets_fedavgm_for_the_federations_only():
    from bench.quality import METHODS, federation_config, parse_args, row_key, run_config

    default = run_config(parse_args(MAIN_TABLE))
    assert "server_momentum" not in default  # FedAvg: the rows cached before the option keep their key
    fed = federation_config(METHODS["fedcl"], default, split="pathological", seed=0, data_root=Path("/x"))
    assert fed.federation.strategy == "FedAvg"
    cfg = run_config(parse_args(MAIN_TABLE + ["--server-momentum", "0.5"]))
    for m in ("fedsimclr", "fedcl", "fedcl_noqueue", "fedcl_dp8"):
        fed = federation_config(METHODS[m], cfg, split="pathological", seed=0, data_root=Path("/x"))
        fed = fed.federation
        assert (fed.strategy, fed.strategy_kwargs) == ("FedAvgM", {"server_momentum": 0.5})
    changed = {m for m in ("pixels", "random", "local", "central", "fedsimclr", "fedcl", "fedcl_noqueue")
               if row_key(cfg, m) != row_key(default, m)}
    assert changed == {"fedsimclr", "fedcl", "fedcl_noqueue"}
