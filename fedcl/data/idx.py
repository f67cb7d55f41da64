"""IDX files (the MNIST format) and Fashion-MNIST from them.

The Debian package ``dataset-fashion-mnist`` installs the four original files under
/usr/share/datasets/fashion-mnist (``train-images-idx3-ubyte.gz`` and so on). torchvision's
reader opens only uncompressed files in its own folder layout, so a small numpy reader is used:
it takes ``.gz`` or plain files and checks the magic number, the shape and the length.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from fedcl.data.types import DataError, ImageSet

DEFAULT_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist`, or pass the folder holding "
    "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] "
    "and t10k-labels-idx1-ubyte[.gz]"
)

# IDX type byte -> big-endian numpy dtype (LeCun's format description).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file, gzip-compressed or plain, into a native-endian numpy array."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"IDX file {path} is corrupt ({exc}); download or reinstall it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); "
            "download or reinstall it"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated in its header; download or reinstall it")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"IDX file {path} holds {len(raw) - header} data bytes but its header {shape} "
            f"says {expected}; the file is truncated or corrupt, download or reinstall it"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _find(root: Path, stem: str) -> Path:
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):  # also torchvision's layout
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found under {root}; {_INSTALL_HINT}")


def load_fashion_mnist(*, root: Path | str = DEFAULT_FASHION_MNIST_ROOT, split: str = "train") -> ImageSet:
    """Fashion-MNIST (Xiao et al. 2017) from its IDX files: 60k train / 10k test, 1x28x28."""
    root = Path(root)
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise DataError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder {root} does not exist; {_INSTALL_HINT}")
    images_path = _find(root, f"{prefixes[split]}-images-idx3-ubyte")
    labels_path = _find(root, f"{prefixes[split]}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path} should hold uint8 images (N, H, W), got {images.dtype} {images.shape}; "
            "download or reinstall it"
        )
    if labels.ndim != 1:
        raise DataError(f"{labels_path} should hold labels (N,), got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; the files come from different releases, reinstall them"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise DataError(f"{labels_path} holds labels outside 0..9; download or reinstall it")
    return ImageSet(
        images=torch.from_numpy(images).unsqueeze(1),  # (N, 1, 28, 28)
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(FASHION_MNIST_CLASSES),
    )
