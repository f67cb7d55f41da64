"""MedMNIST v2 (Yang et al. 2023) from a local ``.npz`` file, e.g. ``pathmnist.npz``.

The file holds ``{train,val,test}_images`` (N, H, W) or (N, H, W, 3) uint8 and
``{split}_labels`` (N, 1) or (N,). Read with ``allow_pickle=False``: an ``.npz`` can carry
pickled objects, and unpickling a file is running its code.

Patient ids (for ``privacy.unit = "patient"``): an optional ``{split}_patients`` array (N,) of
integers or strings (a numpy unicode/bytes array, not objects) names the patient of each image.
They become ``ImageSet.groups``, numbered 0..P-1 in sorted order of the ids. MedMNIST's own
files carry none; a site adds the array to its own file, e.g.
``np.savez(path, train_images=x, train_labels=y, train_patients=ids)``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from fedcl.data.types import DataError, ImageSet

MEDMNIST_SPLITS = ("train", "val", "test")
_HINT = "download the 2D MedMNIST .npz (e.g. pathmnist.npz from https://medmnist.com) and pass its path"


def load_medmnist_npz(*, path: Path | str, split: str = "train") -> ImageSet:
    """Images and labels of one split of a 2D MedMNIST ``.npz`` file."""
    path = Path(path)
    if split not in MEDMNIST_SPLITS:
        raise DataError(f"MedMNIST splits are {', '.join(MEDMNIST_SPLITS)}; got {split!r}")
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass the MedMNIST .npz file itself. {_HINT}")
    if not path.is_file():
        raise DataError(f"MedMNIST file {path} does not exist; {_HINT}")
    image_key, label_key = f"{split}_images", f"{split}_labels"
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if image_key not in keys or label_key not in keys:
                raise DataError(
                    f"{path} has no {image_key!r}/{label_key!r} arrays (it has: "
                    f"{', '.join(sorted(keys)) or 'none'}); is this a MedMNIST .npz? {_HINT}"
                )
            images, labels = npz[image_key], npz[label_key]
            patients = npz[f"{split}_patients"] if f"{split}_patients" in keys else None
    except DataError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(
                f"{path} stores pickled object arrays; fedcl does not unpickle files (it could run "
                "code). Re-save the arrays as plain numeric arrays with np.savez"
            ) from None
        raise DataError(f"{path} is not a readable .npz file ({exc}); {_HINT}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc}); {_HINT}") from None

    if images.dtype != np.uint8:
        raise DataError(f"{path}: {image_key} should be uint8, got {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 3:
        chw = images[:, None]  # (N, 1, H, W)
    elif images.ndim == 4 and images.shape[-1] == 3:
        chw = images.transpose(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
    else:
        raise DataError(
            f"{path}: {image_key} has shape {images.shape}; expected (N, H, W) or (N, H, W, 3) "
            "(3D MedMNIST volumes are not supported)"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            f"{path}: {label_key} has shape {labels.shape}; only single-label sets (N,) or (N, 1) "
            "are supported (multi-label sets such as ChestMNIST are not)"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {label_key} should hold integers, got {labels.dtype}")
    if len(labels) != len(chw):
        raise DataError(f"{path}: {len(chw)} images in {image_key} but {len(labels)} labels in {label_key}")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path}: {label_key} holds negative labels")
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    return ImageSet(
        images=torch.from_numpy(np.ascontiguousarray(chw)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=[str(c) for c in range(num_classes)],
        groups=(None if patients is None
                else _patient_ids(patients, n=len(chw), path=path, key=f"{split}_patients")),
    )


def _patient_ids(patients: np.ndarray, *, n: int, path: Path, key: str) -> torch.Tensor:
    """int64 (N,) ids 0..P-1, numbered in sorted order of the stored ids."""
    if patients.ndim == 2 and patients.shape[1] == 1:
        patients = patients[:, 0]
    if patients.ndim != 1 or len(patients) != n:
        raise DataError(
            f"{path}: {key} has shape {patients.shape}; expected ({n},), one patient id per image")
    if not (np.issubdtype(patients.dtype, np.integer) or patients.dtype.kind in "US"):
        raise DataError(f"{path}: {key} should hold integer or string patient ids, got {patients.dtype}")
    _, ids = np.unique(patients, return_inverse=True)
    return torch.from_numpy(ids.reshape(-1).astype(np.int64))
