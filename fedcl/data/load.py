"""One entry point for every data source, by name, as the config names them."""

from __future__ import annotations

import zlib
from pathlib import Path

from fedcl.data.clutter import Clutter, load_fashion_mnist_cluttered
from fedcl.data.folder import load_image_folder
from fedcl.data.idx import DEFAULT_FASHION_MNIST_ROOT, load_fashion_mnist
from fedcl.data.medmnist import load_medmnist_npz
from fedcl.data.synthetic import make_synthetic
from fedcl.data.types import DataError, ImageSet

DATASET_NAMES = ("fashion-mnist", "fashion-mnist-cluttered", "medmnist", "folder", "synthetic")


def load_dataset(
    *,
    name: str,
    path: Path | str | None = None,
    split: str = "train",
    seed: int = 0,
    num_images: int = 2000,
    num_classes: int = 10,
    image_size: int | None = None,
    channels: int | None = None,
    group_regex: str | None = None,
    clutter: Clutter | None = None,
) -> ImageSet:
    """Load ``split`` of data set ``name``.

    fashion-mnist: IDX files under ``path`` (default /usr/share/datasets/fashion-mnist).
    fashion-mnist-cluttered: the same files in the clutter regime ``clutter`` (default Clutter()).
    medmnist: the ``.npz`` file at ``path``; splits train/val/test.
    folder: the image folder at ``path``; ``path/<split>`` is used when that folder exists.
    group_regex (folder only): the patient id of each file, from its name (see load_image_folder).
    synthetic: ``num_images`` images of ``num_classes`` classes (``image_size`` default 28,
    ``channels`` default 1), drawn from ``seed`` and the split, so train and test differ.
    """
    if group_regex is not None and name != "folder":
        raise DataError(f"a patient-id pattern applies to image folders only, not to data set {name!r} "
                        "(a MedMNIST .npz names patients in a train_patients array)")
    if name == "fashion-mnist":
        return load_fashion_mnist(root=path if path is not None else DEFAULT_FASHION_MNIST_ROOT, split=split)
    if name == "fashion-mnist-cluttered":
        return load_fashion_mnist_cluttered(root=path if path is not None else DEFAULT_FASHION_MNIST_ROOT,
                                            split=split, clutter=clutter)
    if name == "medmnist":
        if path is None:
            raise DataError(
                "data set 'medmnist' needs a path to its .npz file (e.g. data.path=pathmnist.npz)")
        return load_medmnist_npz(path=path, split=split)
    if name == "folder":
        if path is None:
            raise DataError("data set 'folder' needs the path of the image folder (data.path=...)")
        root = Path(path)
        if (root / split).is_dir():
            root = root / split
        return load_image_folder(path=root, channels=channels, image_size=image_size, group_regex=group_regex)
    if name == "synthetic":
        # A different stream for each split: crc32 is stable across processes, unlike hash().
        return make_synthetic(
            num_images=num_images,
            num_classes=num_classes,
            image_size=image_size or 28,
            channels=channels or 1,
            seed=(seed * 1_000_003 + zlib.crc32(split.encode())) % 2**63,
        )
    raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
