import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fedcl.data import FASHION_MNIST_CLASSES, DataError, load_dataset, load_fashion_mnist, read_idx


def write_idx(path: Path, array: np.ndarray, *, type_byte: int = 0x08, compress: bool = True) -> Path:
    be = array.astype(array.dtype.newbyteorder(">"))
    raw = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + be.tobytes()
    if compress:
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_fashion(root: Path, *, n_train: int = 12, n_test: int = 5, compress: bool = True) -> tuple:
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        suffix = ".gz" if compress else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress=compress)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize(
    "dtype,type_byte",
    [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D),
     (np.float64, 0x0E)],
)
def test_read_idx_roundtrip(tmp_path, compress, dtype, type_byte):
    array = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    got = read_idx(write_idx(tmp_path / "a.idx", array, type_byte=type_byte, compress=compress))
    assert got.dtype == np.dtype(dtype)
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, array)


def test_load_fashion_mnist_from_user_folder(tmp_path):
    written = write_fashion(tmp_path)
    train = load_fashion_mnist(root=tmp_path, split="train")
    test = load_fashion_mnist(root=tmp_path, split="test")
    assert train.images.shape == (12, 1, 28, 28) and test.images.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(train.images[:, 0].numpy(), written["train"][0])
    np.testing.assert_array_equal(train.labels.numpy(), written["train"][1].astype(np.int64))
    np.testing.assert_array_equal(test.labels.numpy(), written["t10k"][1].astype(np.int64))
    assert train.classes == FASHION_MNIST_CLASSES
    via_dispatch = load_dataset(name="fashion-mnist", path=tmp_path, split="test")
    np.testing.assert_array_equal(via_dispatch.images.numpy(), test.images.numpy())


def test_load_fashion_mnist_plain_files_in_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    written = write_fashion(raw, compress=False)
    train = load_fashion_mnist(root=tmp_path, split="train")
    np.testing.assert_array_equal(train.images[:, 0].numpy(), written["train"][0])


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        load_fashion_mnist(root=tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*apt-get install"):
        load_fashion_mnist(root=tmp_path)
    with pytest.raises(DataError, match="splits"):
        load_fashion_mnist(root=tmp_path, split="val")


def test_bad_magic(tmp_path):
    p = tmp_path / "x.idx"
    p.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="bad magic") as err:
        read_idx(p)
    assert str(p) in str(err.value)
    p.write_bytes(b"")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(p)


def test_truncated_data_and_header(tmp_path):
    p = write_idx(tmp_path / "a.idx", np.zeros((4, 5), np.uint8), compress=False)
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match="truncated in its header"):
        read_idx(p)


def test_corrupt_gzip(tmp_path):
    p = write_idx(tmp_path / "a.idx.gz", np.zeros((40, 50), np.uint8))
    p.write_bytes(p.read_bytes()[:30])  # cut the deflate stream
    with pytest.raises(DataError, match="corrupt") as err:
        read_idx(p)
    assert str(p) in str(err.value)


def test_mismatched_counts(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(DataError, match="12 images but .* 11 labels"):
        load_fashion_mnist(root=tmp_path, split="train")


def test_wrong_shapes_and_labels(tmp_path):
    write_fashion(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((12, 28 * 28), np.uint8))
    with pytest.raises(DataError, match=r"uint8 images \(N, H, W\)"):
        load_fashion_mnist(root=tmp_path, split="train")
    write_fashion(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(12, 10, np.uint8))
    with pytest.raises(DataError, match="outside 0..9"):
        load_fashion_mnist(root=tmp_path, split="train")


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_installed_fashion_mnist_test_split():
    test = load_fashion_mnist(split="test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.labels.bincount().tolist() == [1000] * 10  # the published test split is balanced
