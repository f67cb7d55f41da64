"""bench/quality.py's `local` row: each site trained alone with the library's local_round (no federation)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not an installed package

import bench.quality as quality  # noqa: E402
from fedcl.augment import TwoViewAugment  # noqa: E402
from fedcl.data import make_synthetic  # noqa: E402
from fedcl.models import build_model, canonical_state_dict  # noqa: E402

SPEC = {"arch": "cnn", "in_channels": 1, "width": 4, "proj_dim": 16, "proj_hidden": 16}
CFG = {"rounds": 4, "local_epochs": 1, "batch_size": 8, "lr": 1e-3, "temperature": 0.2}


def run(monkeypatch, **extra):
    ds = make_synthetic(num_images=32, num_classes=3, seed=0)
    sites = [ds.images[:16], ds.images[16:32]]
    torch.manual_seed(0)
    init = canonical_state_dict(build_model(**SPEC))
    calls = []
    real = quality.local_round

    def spy(model, images, *args, **kw):
        res = real(model, images, *args, **kw)
        calls.append((images, kw["optimizer_state"], res.optimizer_state))
        return res

    monkeypatch.setattr(quality, "local_round", spy)
    models = quality.run_local_only(sites=sites, spec=SPEC, init_state=init, cfg=CFG | extra, seed=0,
                                    augment=TwoViewAugment(), device=torch.device("cpu"))
    return sites, models, calls


def test_shorter_rounds_train_each_image_once_per_epoch(monkeypatch):
    sites, models, calls = run(monkeypatch, rounds_per_epoch=2)
    assert len(models) == 2 and len(calls) == 8  # site-major: 4 rounds of site 0, then of site 1
    for site, per_site in zip(sites, (calls[:4], calls[4:]), strict=True):
        for epoch in (per_site[:2], per_site[2:]):
            seen = torch.cat([images for images, _, _ in epoch])
            assert seen.shape[0] == site.shape[0]
            # the two half-epoch rounds together are the site's images, each once
            assert sorted(map(bytes, seen.flatten(1).numpy())) == sorted(map(bytes, site.flatten(1).numpy()))


def test_persist_optimizer_resumes_the_sites_own_state(monkeypatch):
    _, _, calls = run(monkeypatch, persist_optimizer=True)
    assert calls[0][1] is None and calls[4][1] is None  # each site starts cold
    assert all(calls[i][1] is calls[i - 1][2] for i in (1, 2, 3, 5, 6, 7))  # then its own previous state
    _, _, calls = run(monkeypatch)
    assert all(given is None for _, given, _ in calls)  # default: every round cold
