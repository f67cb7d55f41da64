import numpy as np
import pytest
import torch

from fedcl.data import DataError, load_dataset, load_medmnist_npz


def _arrays(rgb: bool, label_shape: str) -> dict:
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", 9), ("val", 4), ("test", 5)):
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        out[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = rng.integers(0, 4, n)
        out[f"{split}_labels"] = labels[:, None] if label_shape == "n1" else labels
    return out


@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("label_shape", ["n1", "n"])
def test_load_splits(tmp_path, rgb, label_shape):
    arrays = _arrays(rgb, label_shape)
    path = tmp_path / "toy.npz"
    np.savez_compressed(path, **arrays)
    for split in ("train", "val", "test"):
        s = load_medmnist_npz(path=path, split=split)
        images = arrays[f"{split}_images"]
        n = len(images)
        assert s.images.shape == ((n, 3, 28, 28) if rgb else (n, 1, 28, 28))
        expected = images.transpose(0, 3, 1, 2) if rgb else images[:, None]
        np.testing.assert_array_equal(s.images.numpy(), expected)
        np.testing.assert_array_equal(s.labels.numpy(), arrays[f"{split}_labels"].reshape(-1))
        assert s.labels.dtype.is_floating_point is False and s.labels.shape == (n,)
        assert len(s.classes) == int(arrays[f"{split}_labels"].max()) + 1
    assert len(load_dataset(name="medmnist", path=path, split="val")) == 4


def test_bad_keys(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(2))
    with pytest.raises(DataError, match="no 'train_images'.*it has: images, labels") as err:
        load_medmnist_npz(path=path, split="train")
    assert str(path) in str(err.value)
    with pytest.raises(DataError, match="splits"):
        load_medmnist_npz(path=path, split="validation")


def test_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    labels = np.empty(2, dtype=object)
    labels[:] = [0, 1]
    np.savez(path, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=labels)
    # numpy itself would unpickle this with allow_pickle=True; fedcl must refuse
    assert np.load(path, allow_pickle=True)["train_labels"].tolist() == [0, 1]
    with pytest.raises(DataError, match="pickled object arrays"):
        load_medmnist_npz(path=path, split="train")


def test_missing_folder_and_corrupt_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_medmnist_npz(path=tmp_path / "missing.npz", split="train")
    with pytest.raises(DataError, match="is a folder"):
        load_medmnist_npz(path=tmp_path, split="train")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_medmnist_npz(path=bad, split="train")
    with pytest.raises(DataError, match="needs a path"):
        load_dataset(name="medmnist", path=None, split="train")


def test_malformed_arrays(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.zeros((2, 1), np.int64))
    with pytest.raises(DataError, match="3 images .* 2 labels"):
        load_medmnist_npz(path=path, split="train")
    np.savez(path, train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.zeros((3, 14), np.int64))
    with pytest.raises(DataError, match="multi-label"):
        load_medmnist_npz(path=path, split="train")
    np.savez(path, train_images=np.zeros((3, 28, 28, 28), np.uint8), train_labels=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="3D"):
        load_medmnist_npz(path=path, split="train")
    np.savez(path, train_images=np.zeros((3, 28, 28), np.float32), train_labels=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="uint8"):
        load_medmnist_npz(path=path, split="train")


@pytest.mark.parametrize("ids", [np.array([7, 7, 3, 9, 3, 3, 7, 9, 1]), np.array(list("bbacaabc" + "d"))])
def test_patient_ids_become_groups(tmp_path, ids):
    arrays = _arrays(False, "n")
    path = tmp_path / "patients.npz"
    np.savez(path, **arrays, train_patients=ids)
    s = load_medmnist_npz(path=path, split="train")
    assert s.groups.dtype == torch.int64 and s.groups.shape == (9,)
    _, expected = np.unique(ids, return_inverse=True)  # numbered in sorted order of the ids
    np.testing.assert_array_equal(s.groups.numpy(), expected)
    assert load_medmnist_npz(path=path, split="val").groups is None  # no val_patients: no ids
    sub = s.subset([2, 4])
    assert sub.groups.tolist() == [expected[2], expected[4]]


def test_bad_patient_ids(tmp_path):
    arrays = _arrays(False, "n")
    for bad, message in [(np.arange(8), r"expected \(9,\)"), (np.linspace(0, 1, 9), "integer or string")]:
        path = tmp_path / "bad.npz"
        np.savez(path, **arrays, train_patients=bad)
        with pytest.raises(DataError, match=message):
            load_medmnist_npz(path=path, split="train")
