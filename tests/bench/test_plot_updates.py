"""bench/plot_updates.py: curves on the axis of sequential model updates."""

from __future__ import annotations

import json

import pytest

from bench.plot_updates import main, updates_curve

CONFIG = {"sites": 5, "images_per_site": 2000, "batch_size": 64, "rounds_per_epoch": 32}


def test_a_federated_round_of_one_step_is_one_update_and_a_central_epoch_is_a_pass_over_the_union():
    fed = {"rounds": [{"round": 1, "knn": None}, {"round": 32, "knn": 0.5}, {"round": 64, "knn": 0.6}]}
    assert updates_curve(fed, CONFIG, federated=True) == [(32, 50.0), (64, 60.0)]
    central = {"rounds": [{"round": 32, "knn": 0.5}, {"round": 64, "knn": 0.55}]}  # epochs 1 and 2
    assert updates_curve(central, CONFIG, federated=False) == [(157, 50.0), (314, pytest.approx(55.0))]
    assert updates_curve(central, CONFIG | {"batch_size": 320}, federated=False)[0][0] == 32


def test_rounds_of_several_steps_are_refused():
    with pytest.raises(SystemExit, match="more than one local step"):
        updates_curve({"rounds": []}, CONFIG | {"rounds_per_epoch": 8}, federated=True)


def test_the_plot_is_written_and_a_table_without_the_methods_is_an_error(tmp_path, capsys):
    table = tmp_path / "q.json"
    curves = {name: {"rounds": [{"round": 32, "knn": k}]} for name, k in (("fedcl", 0.5), ("central", 0.6))}
    table.write_text(json.dumps({"config": CONFIG, "splits": {"pathological": curves}}))
    assert main([str(table), "--out", str(tmp_path / "u.png")]) == 0
    assert (tmp_path / "u.png").stat().st_size > 0
    assert main([str(table), "--methods", "fedsimclr", "--out", str(tmp_path / "v.png")]) == 2
    assert "none of ['fedsimclr']" in capsys.readouterr().err
