import numpy as np
import pytest
from PIL import Image

from fedcl.data import DataError, load_dataset, load_image_folder


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)


def test_classes_8bit_and_16bit_grey(tmp_path):
    a8 = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # 0..252
    a16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040).astype(np.uint16)  # 0..65520
    a16[0, 0], a16[0, 1], a16[0, 2] = 65535, 257, 128
    _save(tmp_path / "benign" / "p1_a.png", a8)
    _save(tmp_path / "malignant" / "p2_b.png", a16)
    s = load_image_folder(path=tmp_path)
    assert s.classes == ["benign", "malignant"]
    assert s.images.shape == (2, 1, 8, 8) and s.labels.tolist() == [0, 1]
    np.testing.assert_array_equal(s.images[0, 0].numpy(), a8)
    want = np.rint(a16.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(s.images[1, 0].numpy(), want)
    # full range, not clipped: 65535 -> 255, 257 -> 1, a mid value stays mid-grey
    assert s.images[1, 0, 0, 0] == 255 and s.images[1, 0, 0, 1] == 1 and s.images[1, 0, 0, 2] == 0
    assert 100 < int(s.images[1, 0].float().mean()) < 155
    assert s.groups is None


def test_16bit_minmax_for_12bit_data(tmp_path):
    a = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 273)  # 0..4095, 12-bit data
    _save(tmp_path / "x.png", a)
    full = load_image_folder(path=tmp_path)
    mm = load_image_folder(path=tmp_path, scale16="minmax")
    assert full.images.max() == 16  # 4095 * 255 / 65535, dark but not clipped
    assert mm.images.min() == 0 and mm.images.max() == 255
    assert full.labels is None and full.classes == []


def test_rgb_and_mixed_channels(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    _save(tmp_path / "a" / "rgb.png", rgb)
    _save(tmp_path / "b" / "grey.png", grey)
    s = load_image_folder(path=tmp_path)
    assert s.images.shape == (2, 3, 6, 5)
    np.testing.assert_array_equal(s.images[0].numpy(), rgb.transpose(2, 0, 1))
    for c in range(3):  # grey replicated to 3 channels
        np.testing.assert_array_equal(s.images[1, c].numpy(), grey)
    one = load_image_folder(path=tmp_path, channels=1)
    assert one.images.shape == (2, 1, 6, 5)
    lum = np.rint(rgb.astype(np.float64) @ [0.299, 0.587, 0.114])
    assert np.abs(one.images[0, 0].numpy().astype(int) - lum).max() <= 1


def test_flat_unlabeled_folder_groups_and_resize(tmp_path):
    _save(tmp_path / "P07_scan1.png", np.zeros((10, 10), np.uint8))
    _save(tmp_path / "P03_scan1.png", np.full((12, 12), 200, np.uint8))
    _save(tmp_path / "P07_scan2.png", np.zeros((10, 10), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="differ in size.*image_size"):
        load_image_folder(path=tmp_path)
    s = load_image_folder(path=tmp_path, image_size=8, group_regex=r"^(P\d+)_")
    assert s.images.shape == (3, 1, 8, 8) and s.labels is None
    # files sorted by name: P03_scan1, P07_scan1, P07_scan2; groups numbered by sorted id
    assert s.groups.tolist() == [0, 1, 1]
    assert int(s.images[0].min()) == 200
    with pytest.raises(DataError, match="does not match the patient-id pattern"):
        load_image_folder(path=tmp_path, image_size=8, group_regex=r"^Q")


def test_split_subfolder_in_dispatch(tmp_path):
    _save(tmp_path / "train" / "cat" / "1.png", np.zeros((4, 4), np.uint8))
    _save(tmp_path / "train" / "dog" / "1.png", np.zeros((4, 4), np.uint8))
    _save(tmp_path / "test" / "cat" / "1.png", np.zeros((4, 4), np.uint8))
    assert len(load_dataset(name="folder", path=tmp_path, split="train")) == 2
    assert load_dataset(name="folder", path=tmp_path, split="test").classes == ["cat"]


def test_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        load_image_folder(path=tmp_path / "missing")
    assert str(tmp_path / "missing") in str(err.value)
    with pytest.raises(DataError, match="is empty"):
        load_image_folder(path=tmp_path)
    (tmp_path / "cls").mkdir()
    with pytest.raises(DataError, match="own subfolder"):
        load_image_folder(path=tmp_path)  # a class folder without images
    (tmp_path / "cls" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="broken.png cannot be read"):
        load_image_folder(path=tmp_path)
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        load_image_folder(path=f)
    with pytest.raises(DataError, match="needs the path"):
        load_dataset(name="folder", path=None, split="train")
