"""The labelled set behind every kNN figure: one loader, named wherever a figure is printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcl.config import load_config
from fedcl.runtime import KNN_BANK_DEFAULT, load_knn_sets

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.name=synthetic", "data.synthetic_images=400", "data.eval_max_images=50", "model.width=4",
        "model.proj_hidden=32", "model.proj_dim=16", "train.batch_size=100", "train.threads=1"]


def test_the_knn_set_is_a_fixed_subset_and_says_which_images_it_holds():
    cfg = load_config(None, [*TINY, "data.train_max_images=100"])
    sets = load_knn_sets(cfg.data)
    assert sets.bank.images.shape[0] == 100 and sets.test.images.shape[0] == 50 and sets.labelled
    assert sets.description == ("labelled set: fit on 100 of 400 'train' images, scored on 50 of 100 'test' "
                                "images of synthetic (random subsets, seed 0)")
    again = load_knn_sets(cfg.data)
    assert all(
        torch_equal(a, b) for a, b in zip(sets.as_kwargs().values(), again.as_kwargs().values(), strict=True))
    unset = load_knn_sets(load_config(None, TINY).data)  # no train_max_images: up to KNN_BANK_DEFAULT
    assert unset.bank.images.shape[0] == min(400, KNN_BANK_DEFAULT)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


@pytest.mark.e2e  # two CLI processes: about 70 s on a loaded 2-core machine
def test_fedcl_train_and_fedcl_eval_score_on_the_same_named_set(tmp_path):
    """They used different banks (train: every training image; eval: 10000) and named neither."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    sets = [a for s in TINY for a in ("--set", s)]
    out = tmp_path / "central"
    train = subprocess.run([sys.executable, "-m", "fedcl.cli", "train", *sets, "--out", str(out)], env=env,
                           capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr
    evaluated = subprocess.run([sys.executable, "-m", "fedcl.cli", "eval", str(out / "encoder.pt"), *sets,
                                "--no-compare-random"], env=env, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr
    named = ("labelled set: fit on 400 of 400 'train' images, scored on 50 of 100 'test' images of synthetic "
             "(random subsets, seed 0)")
    assert named in train.stdout and named in evaluated.stdout, (train.stdout, evaluated.stdout)
