import pytest
import torch

from fedcl.augment import TwoViewAugment
from fedcl.data import DataError, ImageSet, load_dataset, make_synthetic


def test_shapes_balance_and_determinism():
    a = make_synthetic(num_images=50, num_classes=5, seed=3)
    b = make_synthetic(num_images=50, num_classes=5, seed=3)
    c = make_synthetic(num_images=50, num_classes=5, seed=4)
    assert a.images.shape == (50, 1, 28, 28) and a.images.dtype == torch.uint8
    assert a.labels.bincount().tolist() == [10] * 5
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    rgb = make_synthetic(num_images=4, num_classes=2, image_size=16, channels=3, seed=0, num_groups=2)
    assert rgb.images.shape == (4, 3, 16, 16) and set(rgb.groups.tolist()) <= {0, 1}
    assert len(make_synthetic(num_images=0, num_classes=3, seed=0)) == 0


def test_splits_differ_in_dispatch():
    train = load_dataset(name="synthetic", path=None, split="train", num_images=20, num_classes=4, seed=1)
    test = load_dataset(name="synthetic", path=None, split="test", num_images=20, num_classes=4, seed=1)
    again = load_dataset(name="synthetic", path=None, split="train", num_images=20, num_classes=4, seed=1)
    assert torch.equal(train.images, again.images)
    assert not torch.equal(train.images, test.images)
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset(name="cifar", path=None, split="train")


def _nearest_centroid_accuracy(train: ImageSet, test: ImageSet, aug: TwoViewAugment | None) -> float:
    # Features: magnitude of the 2-D spectrum (phase-invariant), from augmented views if given.
    def feats(s: ImageSet, seed: int) -> torch.Tensor:
        x = s.as_float()
        if aug is not None:
            x = aug(x, generator=torch.Generator().manual_seed(seed))
        f = torch.fft.fft2(x - x.mean(dim=(2, 3), keepdim=True)).abs().flatten(1)
        return torch.nn.functional.normalize(f, dim=1)

    ftr, fte = feats(train, 0), feats(test, 1)
    k = train.num_classes
    centroids = torch.stack([ftr[train.labels == c].mean(0) for c in range(k)])
    pred = (fte @ centroids.T).argmax(1)
    return float((pred == test.labels).float().mean())


def test_classes_are_separable_even_after_augmentation():
    train = make_synthetic(num_images=400, num_classes=10, seed=0)
    test = make_synthetic(num_images=200, num_classes=10, seed=1)
    assert _nearest_centroid_accuracy(train, test, None) > 0.9
    # a random guess is 0.1; the class signal survives crop, flip, jitter, blur and noise
    assert _nearest_centroid_accuracy(train, test, TwoViewAugment()) > 0.5


def test_invalid_arguments():
    with pytest.raises(DataError):
        make_synthetic(num_images=10, num_classes=0, seed=0)
    with pytest.raises(DataError):
        make_synthetic(num_images=10, num_classes=2, channels=2, seed=0)
