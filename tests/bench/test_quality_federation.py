"""bench/quality.py's federated rows come from the shipped federation: the bench has no round code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not an installed package

from bench.quality import METHODS, Data, federation_config, full_eval, run_method  # noqa: E402
from fedcl.augment import TwoViewAugment  # noqa: E402
from fedcl.config import load_config  # noqa: E402
from fedcl.models import load_encoder  # noqa: E402
from fedcl.sim.inprocess import run_federation_inprocess  # noqa: E402

ROOT = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not any(ROOT.glob("train-images-idx3-ubyte*")),
                                reason=f"needs the Fashion-MNIST IDX files under {ROOT}")

# 2 sites x 32 images, 2 rounds of a width-4 CNN: the recipe bench/quality.py would pass
CFG = {"rounds": 2, "local_epochs": 1, "images_per_site": 32, "sites": 2, "width": 4, "batch_size": 16,
       "lr": 1e-3, "temperature": 0.2, "queue_temperature": 0.1, "num_negatives": 64, "num_push": 16,
       "crop_scale_min": 0.3, "test_images": 100, "public_images": 32, "rounds_per_epoch": 1,
       "persist_optimizer": False, "threads": 1}
# the same federation as a user writes it for `fedcl simulate --engine inprocess` (shipped keys)
SAME_BY_HAND = [
    f"data.path='{ROOT}'", "data.partition=pathological", "data.classes_per_site=2", "data.num_sites=2",
    "data.max_images_per_site=32", "data.seed=0", "data.train_max_images=64", "data.eval_max_images=100",
    "model.in_channels=1", "model.width=4", "train.batch_size=16", "train.lr=1e-3", "train.num_push=16",
    "train.key_encoder='global'", "train.threads=1", "train.device='cpu'", "queue.num_negatives=64",
    "queue.fresh_push=true", "queue.max_staleness=0", "queue.warmup_rounds=1", "queue.public_images=32",
    "queue.dtype='float32'", "privacy.num_prototypes=16", "privacy.release_noise_multiplier=2.0",
    "privacy.release_sample_rate=0.5", "federation.num_rounds=2", "federation.fraction_evaluate=0.0",
]


def test_fedcl_row_is_the_shipped_federation_run_directly(tmp_path):
    """The bench's fedcl row and the shipped in-process federation of the hand-written config give the
    same final encoder, per-round losses and metrics at the same seed."""
    data_src = Data(root=ROOT)
    data = data_src.setup(split="pathological", seed=0, num_sites=2, images_per_site=32, test_images=100)
    row = run_method("fedcl", data=data, cfg=CFG, split="pathological", seed=0, data_root=ROOT,
                     device=torch.device("cpu"), bar=None)

    config = load_config(None, SAME_BY_HAND)
    assert config == federation_config(METHODS["fedcl"], CFG, split="pathological", seed=0, data_root=ROOT)
    direct = run_federation_inprocess(config, out_dir=tmp_path / "direct")
    model, _ = load_encoder(direct.encoder_path)
    metrics = full_eval(model, data, augment=TwoViewAugment(crop_scale=(0.3, 1.0)),
                        device=torch.device("cpu"), seed=0)

    # Equal up to float summation order: the queue service samples with its own secret-seeded RNG, so two
    # runs of one federation get the same negatives (K covers every entry here) in another order. On
    # 100 test images one changed prediction moves an accuracy by 0.01, far outside these tolerances.
    assert row["metrics"] == pytest.approx(metrics, rel=1e-5, abs=1e-6)
    assert [r["loss"] for r in row["rounds"]] == pytest.approx([r["loss"] for r in direct.history], rel=1e-6)
    assert [r["negatives"] for r in row["rounds"]] == [r["negatives_used"] for r in direct.history]
    assert row["rounds"][-1]["negatives"] > 0  # round 2 trained with queue negatives
    # the bench's sites are the partitions the federation's sites trained on
    assert [s.shape[0] for s in data["sites"]] == [32, 32]
    assert [len(c) for c in data["site_classes"]] == [2, 2]


def test_each_method_maps_to_the_shipped_settings():
    def config(name):
        return federation_config(METHODS[name], CFG, split="dirichlet0.1", seed=3, data_root=ROOT)

    fedsimclr, noqueue, dp, protos = (config(n) for n in ("fedsimclr", "fedcl_noqueue", "fedcl_dp8",
                                                         "fedcl_prototypes"))
    assert (fedsimclr.train.key_encoder, fedsimclr.queue.enabled) == ("online", False)
    assert (noqueue.train.key_encoder, noqueue.queue.enabled) == ("global", False)
    assert dp.privacy.dpsgd and dp.privacy.target_epsilon == 8.0 and not dp.train.in_batch_negatives
    assert (dp.queue.warmup_rounds, dp.queue.fresh_push) == (0, True)
    assert protos.privacy.release == "prototypes"
    assert (protos.queue.fresh_push, protos.queue.max_staleness) == (True, 0)  # as the shipped default
    assert (protos.data.partition, protos.data.alpha) == ("dirichlet", 0.1)
    assert (protos.data.seed, protos.train.seed) == (3, 3)
    assert config("fedcl_public").privacy.release == "public"
