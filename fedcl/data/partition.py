"""Split a labeled set across sites: iid, Dirichlet label skew, or pathological (k classes each).

Why not flwr-datasets' partitioners (IidPartitioner, DirichletPartitioner,
PathologicalPartitioner): they partition a Hugging Face ``datasets.Dataset`` by a column, so using
them would pull ``datasets`` and ``pyarrow`` into ``fedcl/`` only to split an integer array we
already hold in memory, and ``fedcl/`` stays free of Flower packages by design. The schemes are
the standard ones and short: Dirichlet as in Hsu et al. 2019 ("Measuring the effects of non-identical
data distribution", per-class proportions drawn from Dir(alpha)), pathological as in McMahan et
al. 2017 (each site sees only k classes).

All schemes are deterministic given ``seed`` and give every site at least one index. iid and
dirichlet cover every index exactly once; pathological covers every index of every class that
some site holds (all classes when ``num_sites * classes_per_site >= num_classes``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedcl.data.types import DataError

_DIRICHLET_ATTEMPTS = 1000


def _check_labels(labels: np.ndarray, num_sites: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if num_sites < 1:
        raise DataError(f"num_sites must be >= 1, got {num_sites}")
    if len(labels) < num_sites:
        raise DataError(
            f"cannot give each of {num_sites} sites an image: only {len(labels)} images; "
            "use fewer sites or more data"
        )
    return labels.astype(np.int64, copy=False)


def _iid(n: int, num_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(n), num_sites))


def _dirichlet(labels: np.ndarray, num_sites: int, alpha: float,
               rng: np.random.Generator) -> list[np.ndarray]:
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(_DIRICHLET_ATTEMPTS):
        sites: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for idx in by_class:
            idx = rng.permutation(idx)
            share = rng.dirichlet(np.full(num_sites, alpha))  # (num_sites,) site shares of this class
            cuts = np.round(np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
            for site, part in enumerate(np.split(idx, cuts)):
                sites[site].append(part)
        parts = [np.concatenate(s) for s in sites]
        if min(len(p) for p in parts) > 0:  # resample until no site is empty
            return parts
    raise DataError(
        f"Dirichlet split with alpha={alpha} left a site empty in {_DIRICHLET_ATTEMPTS} draws "
        f"({len(labels)} images, {num_sites} sites); raise alpha, use fewer sites or more data"
    )


def _pathological(
    labels: np.ndarray, num_sites: int, classes_per_site: int, rng: np.random.Generator
) -> list[np.ndarray]:
    present = np.unique(labels)
    if not 1 <= classes_per_site <= len(present):
        raise DataError(
            f"classes_per_site must be between 1 and the {len(present)} classes present, "
            f"got {classes_per_site}"
        )
    order = rng.permutation(present)
    # Round robin over a shuffled class order: site s holds k consecutive classes (mod C), so
    # each site has k distinct classes and, when num_sites * k >= C, every class has a holder.
    held = [
        order[(s * classes_per_site + np.arange(classes_per_site)) % len(present)] for s in range(num_sites)]
    holders: dict[int, list[int]] = {}
    for s, cls in enumerate(held):
        for c in cls:
            holders.setdefault(int(c), []).append(s)
    sites: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for c in sorted(holders):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for s, part in zip(holders[c], np.array_split(idx, len(holders[c])), strict=False):
            sites[s].append(part)
    parts = [np.concatenate(s) for s in sites]
    empty = [s for s, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DataError(
            f"pathological split left sites {empty} empty: their classes have fewer images than "
            "sites sharing them; use fewer sites, more classes_per_site or more data"
        )
    return parts


def partition(
    labels: np.ndarray,
    *,
    scheme: Literal["iid", "dirichlet", "pathological"],
    num_sites: int,
    alpha: float = 0.5,
    classes_per_site: int = 2,
    seed: int,
) -> list[np.ndarray]:
    """Indices into ``labels`` for each site: a list of ``num_sites`` sorted int64 arrays.

    iid: a random equal split. dirichlet: each class split across sites by shares drawn from
    Dir(alpha); small alpha gives skewed sites (0.1 very, 0.5 moderately, 100 close to iid).
    pathological: each site holds ``classes_per_site`` classes, each class split equally among
    the sites holding it.
    """
    labels = _check_labels(labels, num_sites)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _iid(len(labels), num_sites, rng)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
        parts = _dirichlet(labels, num_sites, alpha, rng)
    elif scheme == "pathological":
        parts = _pathological(labels, num_sites, classes_per_site, rng)
    else:
        raise DataError(f"unknown partition scheme {scheme!r}; use 'iid', 'dirichlet' or 'pathological'")
    return [np.sort(p).astype(np.int64) for p in parts]


def site_class_counts(
    labels: np.ndarray, parts: list[np.ndarray], *, num_classes: int | None = None
) -> np.ndarray:
    """Images of each class at each site, int64 (num_sites, num_classes); for reports and checks."""
    labels = np.asarray(labels, dtype=np.int64)
    k = max(num_classes or 0, int(labels.max()) + 1 if len(labels) else 0)
    counts = np.zeros((len(parts), k), np.int64)
    for site, idx in enumerate(parts):
        counts[site] = np.bincount(labels[idx], minlength=k)
    return counts
