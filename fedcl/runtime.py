"""Edge glue: turn validated settings into library objects (data, model, augmentation).

The CLIs and the Flower adapters call these; library functions below them take plain
keyword arguments only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedcl.augment import TwoViewAugment
from fedcl.config import AugmentSettings, DataSettings, ModelSettings
from fedcl.data import ImageSet, load_dataset, partition
from fedcl.models import ContrastiveModel, build_model


def configure_threads(threads: int | None) -> None:
    """Use the cores we have without oversubscription (2 here): intra-op threads only."""
    if threads is not None:
        torch.set_num_threads(threads)
    else:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


def make_augment(a: AugmentSettings) -> TwoViewAugment:
    return TwoViewAugment(
        crop_scale=(a.crop_scale_min, 1.0), flip=a.flip, brightness=a.brightness,
        contrast=a.contrast, blur_prob=a.blur_prob, noise_std=a.noise_std,
    )


def make_model(m: ModelSettings, *, in_channels: int) -> ContrastiveModel:
    return build_model(arch=m.arch, in_channels=in_channels, width=m.width, proj_dim=m.proj_dim,
                       proj_hidden=m.proj_hidden)


def load_split(d: DataSettings, *, split: str) -> ImageSet:
    if d.name == "synthetic":
        from fedcl.data import make_synthetic

        offset = 0 if split == "train" else 1
        n = d.synthetic_images if split == "train" else max(d.synthetic_images // 4, d.synthetic_classes * 4)
        return make_synthetic(num_images=n, num_classes=d.synthetic_classes, seed=d.seed + offset)
    if d.name == "fashion-mnist-cluttered":
        from fedcl.data import Clutter

        return load_dataset(name=d.name, path=d.path, split=split, clutter=Clutter(**d.clutter.model_dump()))
    return load_dataset(name=d.name, path=d.path, split=split)


def subset(ds: ImageSet, idx: torch.Tensor) -> ImageSet:
    return ImageSet(
        images=ds.images[idx],
        labels=None if ds.labels is None else ds.labels[idx],
        classes=ds.classes,
        groups=None if ds.groups is None else ds.groups[idx],
    )


def first_n(ds: ImageSet, n: int | None, *, seed: int) -> ImageSet:
    """A fixed random subset of n images (all when n is None or larger)."""
    if n is None or n >= ds.images.shape[0]:
        return ds
    idx = torch.randperm(ds.images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return subset(ds, idx.sort().values)


KNN_BANK_DEFAULT = 10000  # train images in the kNN bank when data.train_max_images is unset


@dataclass(frozen=True)
class KnnSets:
    """The labelled sets of a kNN figure: ``bank`` (labelled features that vote) and ``test``."""

    bank: ImageSet
    test: ImageSet
    description: str  # "labelled set: fit on ... scored on ...", printed with the figure

    @property
    def labelled(self) -> bool:
        return self.bank.labels is not None and self.test.labels is not None

    def as_kwargs(self) -> dict[str, torch.Tensor | None]:
        """``train_images``, ``train_labels``, ``test_images``, ``test_labels`` (fedcl.evaluate's names)."""
        return {"train_images": self.bank.images, "train_labels": self.bank.labels,
                "test_images": self.test.images, "test_labels": self.test.labels}


def load_knn_sets(d: DataSettings) -> KnnSets:
    """The one labelled set every kNN figure uses (``fedcl train``, ``fedcl eval`` and the coordinator):
    a bank of ``data.train_max_images`` train images (10000 when unset) and ``data.eval_max_images``
    images of ``data.eval_split``, each a fixed random subset drawn with ``data.seed``."""
    train, test = load_split(d, split="train"), load_split(d, split=d.eval_split)
    bank, held_out = first_n(train, d.train_max_images or KNN_BANK_DEFAULT, seed=d.seed), first_n(
        test, d.eval_max_images, seed=d.seed)
    source = d.name if d.path is None else f"{d.name} at {d.path}"
    description = (
        f"labelled set: fit on {bank.images.shape[0]} of {train.images.shape[0]} 'train' images, "
        f"scored on {held_out.images.shape[0]} of {test.images.shape[0]} '{d.eval_split}' images of "
        f"{source} (random subsets, seed {d.seed})")
    return KnnSets(bank=bank, test=held_out, description=description)


def site_partition(d: DataSettings, ds: ImageSet, *, site_index: int) -> ImageSet:
    """The ``site_index``-th of ``d.num_sites`` partitions of a labelled data set."""
    if ds.labels is None:
        raise ValueError("partitioning a shared data set across simulated sites needs labels")
    parts = partition(ds.labels.numpy(), scheme=d.partition, num_sites=d.num_sites, alpha=d.alpha,
                      classes_per_site=d.classes_per_site, seed=d.seed)
    if not 0 <= site_index < len(parts):
        raise ValueError(f"site index {site_index} is outside 0..{len(parts) - 1}")
    idx = torch.from_numpy(parts[site_index]).long()
    site = subset(ds, idx)
    return first_n(site, d.max_images_per_site, seed=d.seed + site_index)


class JsonlLog:
    """Append-only JSON lines, flushed per record."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
