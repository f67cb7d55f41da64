import numpy as np
import pytest
import torch

from fedcl.data import DataError, ImageSet


def test_subset_and_properties():
    s = ImageSet(
        images=torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).reshape(4, 3, 2, 2),
        labels=torch.tensor([0, 1, 1, 0]),
        classes=["a", "b"],
        groups=torch.tensor([5, 5, 6, 7]),
    )
    sub = s.subset(np.array([2, 0]))
    assert len(sub) == 2 and sub.channels == 3 and sub.image_size == (2, 2) and sub.num_classes == 2
    assert torch.equal(sub.images, s.images[[2, 0]])
    assert sub.labels.tolist() == [1, 0] and sub.groups.tolist() == [6, 5]
    f = s.as_float()
    assert f.dtype == torch.float32 and float(f.max()) == pytest.approx(47 / 255)


def test_validation():
    good = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(images=good.float())
    with pytest.raises(ValueError, match="1 or 3 channels"):
        ImageSet(images=torch.zeros(2, 2, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="labels must be an int64"):
        ImageSet(images=good, labels=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        ImageSet(images=good, labels=torch.tensor([0, 1]), classes=["only"])
    with pytest.raises(DataError, match="no labels"):
        ImageSet(images=good).labels_numpy()
