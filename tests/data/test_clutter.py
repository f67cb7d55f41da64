"""The cluttered Fashion-MNIST regime (fedcl.data.clutter): deterministic, item kept whole, labels kept."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcl.augment import TwoViewAugment
from fedcl.config import ConfigError, DataSettings, load_config
from fedcl.data import DataError, load_dataset, make_cluttered, make_synthetic
from fedcl.models import build_model
from fedcl.runtime import load_split
from tests.data.test_idx import write_fashion


@pytest.fixture(scope="module")
def base():
    return make_synthetic(num_images=24, num_classes=4, seed=0)  # 28-px gratings, every pixel lit


def _place(canvas: np.ndarray, item: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where ``canvas`` covers ``item`` (window >= item elementwise)."""
    s, c = item.shape[0], canvas.shape[0]
    return [
        (t, u)
        for t in range(c - s + 1)
        for u in range(c - s + 1)
        if (canvas[t : t + s, u : u + s] >= item).all()]


def test_same_seed_same_images_other_seed_other_images(base):
    a = make_cluttered(base, seed=5)
    assert a.images.shape == (24, 1, 40, 40) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, make_cluttered(base, seed=5).images)
    assert not torch.equal(a.images, make_cluttered(base, seed=6).images)
    assert torch.equal(a.labels, base.labels) and a.classes == base.classes


def test_each_item_lies_whole_inside_the_canvas_and_clutter_only_adds(base):
    bare = make_cluttered(base, canvas=36, patches=0, seed=1).images[:, 0].numpy()
    cluttered = make_cluttered(base, canvas=36, patches=3, patch_size=10, seed=1).images[:, 0].numpy()
    items = base.images[:, 0].numpy()
    tops = set()
    for i in range(len(items)):
        ((t, u),) = [
            p
            for p in _place(bare[i], items[i])
            if (bare[i][p[0] : p[0] + 28, p[1] : p[1] + 28] == items[i]).all()]
        assert bare[i].sum(dtype=np.int64) == items[i].sum(dtype=np.int64)  # nothing outside the item
        assert (t, u) in _place(cluttered[i], items[i])  # the same place, never covered
        tops.add((t, u))
    assert len(tops) > 10  # positions vary
    assert (cluttered >= bare).all() and (cluttered > bare).any()  # patches composited by max


def test_scale_resizes_the_item_and_bad_sizes_are_refused(base):
    small = make_cluttered(base, canvas=20, scale=0.5, patches=2, patch_size=6, seed=0)
    assert small.images.shape == (24, 1, 20, 20)
    with pytest.raises(DataError, match="does not fit the 30-px canvas"):
        make_cluttered(base, canvas=30, scale=1.2, seed=0)
    with pytest.raises(DataError, match="patch_size"):
        make_cluttered(base, patch_size=29, seed=0)
    with pytest.raises(DataError, match="only one"):
        make_cluttered(base.subset([0]), seed=0)


def test_config_names_the_regime_and_the_model_and_augment_take_its_size(tmp_path):
    files = write_fashion(tmp_path, n_train=12, n_test=5)
    cfg = load_config(None, ["data.name=fashion-mnist-cluttered", f"data.path='{tmp_path}'",
                             "data.clutter.canvas=44", "data.clutter.seed=3"])
    train = load_split(cfg.data, split="train")
    assert train.images.shape == (12, 1, 44, 44)
    assert train.labels.tolist() == files["train"][1].tolist()
    assert torch.equal(train.images, load_split(cfg.data, split="train").images)
    assert load_split(cfg.data, split="test").images.shape == (5, 1, 44, 44)
    other = cfg.data.model_copy(update={"clutter": cfg.data.clutter.model_copy(update={"seed": 4})})
    assert not torch.equal(train.images, load_split(other, split="train").images)
    # sites rebuild the data settings from the round config's JSON copy of them
    assert DataSettings.model_validate(cfg.data.model_dump(mode="json")) == cfg.data
    direct = load_dataset(name="fashion-mnist-cluttered", path=tmp_path, split="train")  # Clutter() defaults
    assert direct.images.shape == (12, 1, 40, 40)

    view = TwoViewAugment()(train.images[:4])  # the crop follows the image: (4, 1, 44, 44)
    assert view.shape == (4, 1, 44, 44)
    model = build_model(in_channels=1, width=4, proj_dim=8, proj_hidden=16)
    assert model.features(view).shape == (4, 16) and model(view).shape == (4, 8)


@pytest.mark.parametrize("override,fix", [("data.clutter.canvas=20", "raise canvas to at least 28"),
                                          ("data.clutter.scale=2.0", "raise canvas to at least 56"),
                                          ("data.clutter.patch_size=30", "use at most 28"),
                                          ("data.clutter.patches=-1", "greater than or equal to 0")])
def test_bad_clutter_settings_get_one_line_naming_key_and_fix(override, fix):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.name=fashion-mnist-cluttered", override])
    problems = [line for line in str(e.value).splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and problems[0].startswith("  - data.clutter") and fix in problems[0]


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not any(FASHION.glob("t10k-images-idx3-ubyte*")),
                    reason=f"needs Fashion-MNIST under {FASHION}")
def test_real_test_split_is_reproducible_and_differs_from_plain():
    a = load_dataset(name="fashion-mnist-cluttered", path=FASHION, split="test")
    plain = load_dataset(name="fashion-mnist", path=FASHION, split="test")
    assert a.images.shape == (10000, 1, 40, 40) and torch.equal(a.labels, plain.labels)
    b = load_dataset(name="fashion-mnist-cluttered", path=FASHION, split="test")
    assert torch.equal(a.images, b.images)
    # pinned digest: the same images on any machine (PCG64 and integer indexing only at scale 1)
    assert hashlib.sha256(a.images.numpy().tobytes()).hexdigest()[:16] == "8ad55ff5b5e16ca6"
