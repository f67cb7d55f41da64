import numpy as np
import pytest

from fedcl.data import DataError, partition, site_class_counts


def _labels(n=1000, k=10, seed=0):
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def _assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_deterministic_nonempty_and_seed_dependent(scheme):
    y = _labels()
    a = partition(y, scheme=scheme, num_sites=7, alpha=0.3, classes_per_site=2, seed=5)
    b = partition(y, scheme=scheme, num_sites=7, alpha=0.3, classes_per_site=2, seed=5)
    c = partition(y, scheme=scheme, num_sites=7, alpha=0.3, classes_per_site=2, seed=6)
    assert len(a) == 7 and all(len(p) > 0 for p in a)
    assert all(p.dtype == np.int64 for p in a)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=False))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=False))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_sites", [1, 3, 10])
def test_cover_every_index_exactly_once(scheme, num_sites):
    y = _labels(n=503)
    _assert_exact_cover(partition(y, scheme=scheme, num_sites=num_sites, alpha=0.1, seed=0), 503)


def test_iid_sizes_balanced_and_label_mix_close_to_global():
    y = _labels(n=1000)
    parts = partition(y, scheme="iid", num_sites=4, seed=0)
    assert [len(p) for p in parts] == [250] * 4
    frac = site_class_counts(y, parts) / 250
    assert np.abs(frac - 0.1).max() < 0.08


def _skew(y, parts):
    # mean total-variation distance between each site's label mix and the global one
    counts = site_class_counts(y, parts)
    site = counts / counts.sum(1, keepdims=True)
    glob = np.bincount(y) / len(y)
    return float(0.5 * np.abs(site - glob).sum(1).mean())


def test_dirichlet_skew_grows_as_alpha_shrinks():
    y = _labels(n=5000)
    skews = [
        np.mean([_skew(y, partition(y, scheme="dirichlet", num_sites=10, alpha=a, seed=s)) for s in range(3)])
        for a in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < 0.1 < skews[1] < skews[2]
    assert skews[2] > 0.5


@pytest.mark.parametrize("num_sites,k", [(5, 2), (10, 2), (4, 3), (3, 1)])
def test_pathological_classes_per_site(num_sites, k):
    y = _labels(n=1200, k=10)
    parts = partition(y, scheme="pathological", num_sites=num_sites, classes_per_site=k, seed=2)
    counts = site_class_counts(y, parts, num_classes=10)
    assert ((counts > 0).sum(1) == k).all()  # exactly k distinct classes at each site
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)  # no index at two sites
    held = counts.sum(0) > 0
    if num_sites * k >= 10:
        _assert_exact_cover(parts, 1200)
    else:  # classes no site holds are left out entirely
        assert held.sum() == num_sites * k
        assert set(np.unique(y[allidx])) == set(np.flatnonzero(held))
        assert len(allidx) == int((np.isin(y, np.flatnonzero(held))).sum())


def test_pathological_with_sparse_label_values():
    y = np.repeat([3, 7, 42], 20)  # labels need not be 0..K-1
    parts = partition(y, scheme="pathological", num_sites=3, classes_per_site=1, seed=0)
    assert sorted(len(np.unique(y[p])) for p in parts) == [1, 1, 1]
    _assert_exact_cover(parts, 60)


def test_errors():
    y = _labels(n=20, k=4)
    with pytest.raises(DataError, match="only 20 images"):
        partition(y, scheme="iid", num_sites=21, seed=0)
    with pytest.raises(DataError, match="unknown partition scheme"):
        partition(y, scheme="shards", num_sites=2, seed=0)
    with pytest.raises(DataError, match="classes_per_site"):
        partition(y, scheme="pathological", num_sites=2, classes_per_site=5, seed=0)
    with pytest.raises(DataError, match="alpha"):
        partition(y, scheme="dirichlet", num_sites=2, alpha=0.0, seed=0)
    with pytest.raises(DataError, match="1-D integer"):
        partition(y.astype(float), scheme="iid", num_sites=2, seed=0)
    # a class with 1 image shared by 2 of the 4 sites: one of them must stay empty
    with pytest.raises(DataError, match="left sites .* empty"):
        partition(np.array([0, 1, 1, 1, 1, 1]), scheme="pathological", num_sites=4, classes_per_site=1,
                  seed=0)
    # tiny alpha with as many sites as images almost surely leaves a site empty in every draw
    with pytest.raises(DataError, match="raise alpha"):
        partition(np.zeros(6, np.int64), scheme="dirichlet", num_sites=6, alpha=1e-3, seed=0)
