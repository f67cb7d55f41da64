"""Differentially private ways for a site to share embeddings (DESIGN "Privacy model", channel 2).

Both mechanisms below are Poisson-subsampled Gaussian mechanisms, so a release is accounted in
the site's ledger exactly like a DP-SGD step: ``ledger.record_release(mode, noise_multiplier,
sample_rate, count=1)``.

Prototypes (``release_prototypes``): each Poisson-sampled record (norm clipped to <= 1) is
assigned to its nearest public prototype; the site releases per-prototype sums (P, d) and counts
(P,), each coordinate plus N(0, (noise_multiplier * sqrt(2))^2). Adjacency: add/remove one record
(one group with ``groups=``). One record changes one sum by a vector of norm <= 1 and one count by
1, so the joint L2 sensitivity of (sums, counts) is sqrt(2); noise std = noise_multiplier *
sqrt(2) on every coordinate makes it a Gaussian mechanism with exactly ``noise_multiplier``
(= std / sensitivity), the figure the accountant uses. (The same noise on sums and counts is a
choice: counts only gate the merge, so a split with more noise on counts would also be valid; we
keep one sigma so the accounting is plain to check.)

Per-record Gaussian (``release_gaussian``): every record is clipped to norm <= 1 and released
as record + N(0, noise_multiplier^2 I). A record's presence cannot hide behind noise if only the
sampled rows are published (the number of rows gives it away), so the adjacency here is
*zero-out* (Kairouz et al. 2021, "Practical and private (deep) learning without sampling or
shuffling"): a record is replaced by a null record whose embedding is the zero vector. The
release therefore has one row per record, in random order: sampled records give record + noise,
the others noise only. For the target record its row is then (1 - q) N(0, s^2) + q N(x, s^2)
against N(0, s^2): exactly the Poisson-subsampled Gaussian mechanism (sensitivity 1) that
Opacus' accountants analyse. For DP-SGD and the prototype sums a null record contributes nothing,
so zero-out and add/remove give the same ε there; the number of records N is public under
zero-out (it is also sent in the clear as FedAvg's num-examples). With sample_rate = 1 every row
carries signal.

Group (patient) privacy: pass ``groups`` (N,) and ``max_per_group`` G; groups are Poisson-sampled
and contribute at most G records, each weighted 1/G (prototypes: a group moves the sums by <= 1
and the counts by <= 1 in L2) or clipped to 1/sqrt(G) (per-record: the group's rows move by <= 1
in L2 together), so the same noise_multiplier is then a per-group guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedcl.privacy.sampling import group_poisson_sample, poisson_sample

GAUSSIAN_SENSITIVITY = 1.0
PROTOTYPE_SENSITIVITY = math.sqrt(2.0)


@dataclass(frozen=True)
class PrototypeRelease:
    """What a site publishes in prototypes mode: noisy per-prototype sums (P, d) and counts (P,)."""

    sums: torch.Tensor
    counts: torch.Tensor


@dataclass(frozen=True)
class LazyRecords:
    """``n`` records whose ``dim``-wide embeddings are computed only for the rows a release samples.

    ``embed`` maps (B,) record indices to their (B, dim) embeddings. A prototype release then encodes
    about ``sample_rate * n`` images, not all ``n``: the sampling, the noise and the accounting are
    those of the same release over all ``n`` embeddings.
    """

    n: int
    dim: int
    embed: Callable[[torch.Tensor], torch.Tensor]


def clip_rows(x: torch.Tensor, *, max_norm: float) -> torch.Tensor:
    """Scale each row of (N, d) ``x`` down to L2 norm <= ``max_norm`` (rows already within are kept)."""
    norms = x.norm(dim=1, keepdim=True)  # (N, 1)
    return x * (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)


def _validated(embeddings: torch.Tensor, noise_multiplier: float, sample_rate: float) -> torch.Tensor:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (N, d), got shape {tuple(embeddings.shape)}")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or Inf")
    _check_mechanism(noise_multiplier, sample_rate)
    return embeddings.detach().to("cpu", torch.float32)


def _check_mechanism(noise_multiplier: float, sample_rate: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(
            f"noise_multiplier must be > 0 for a DP release, got {noise_multiplier} (use release mode 'raw' "
            "to share embeddings without DP)"
        )
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")


def _sample(n: int, *, sample_rate: float, generator: torch.Generator | None, groups: torch.Tensor | None,
            max_per_group: int) -> torch.Tensor:
    if groups is None:
        if max_per_group != 1:
            raise ValueError("max_per_group needs groups=")
        return poisson_sample(num_examples=n, sample_rate=sample_rate, generator=generator)
    if groups.numel() != n:
        raise ValueError(f"groups has {groups.numel()} entries for {n} embeddings")
    if max_per_group < 1:
        raise ValueError(f"max_per_group must be >= 1, got {max_per_group}")
    return group_poisson_sample(groups=groups.reshape(-1).cpu(), sample_rate=sample_rate,
                                max_per_group=max_per_group, generator=generator)


def release_gaussian(
    embeddings: torch.Tensor,
    *,
    noise_multiplier: float,
    sample_rate: float,
    generator: torch.Generator | None,
    groups: torch.Tensor | None = None,
    max_per_group: int = 1,
) -> tuple[torch.Tensor, int]:
    """Per-record Gaussian release. embeddings: (N, d), norm <= 1 after clipping.

    Returns (released (N, d) float32 in random order, n_sampled). Rows are not normalised;
    normalising them afterwards is post-processing and free. ``n_sampled`` (how many rows carry
    a record) is for local metrics only: it is not protected and must not be shared.
    Accounted as (noise_multiplier, sample_rate), zero-out adjacency (see module docstring).
    """
    x = _validated(embeddings, noise_multiplier, sample_rate)
    n, d = x.shape
    idx = _sample(n, sample_rate=sample_rate, generator=generator, groups=groups, max_per_group=max_per_group)
    bound = GAUSSIAN_SENSITIVITY / math.sqrt(max_per_group)  # a group's rows move by <= 1 together
    signal = torch.zeros(n, d)
    signal[idx] = clip_rows(x[idx], max_norm=bound)  # unsampled rows: the null record's zero vector
    noisy = signal + noise_multiplier * GAUSSIAN_SENSITIVITY * torch.randn(n, d, generator=generator)
    perm = torch.randperm(n, generator=generator)
    return noisy[perm], int(idx.numel())


def _check_prototypes(prototypes: torch.Tensor, dim: int) -> None:
    """Raise ValueError unless ``prototypes`` is (P >= 1, ``dim``)."""
    if prototypes.dim() != 2 or prototypes.shape[1] != dim or prototypes.shape[0] == 0:
        raise ValueError(f"prototypes must be (P >= 1, {dim}), got shape {tuple(prototypes.shape)}")


def release_prototypes(
    embeddings: torch.Tensor | LazyRecords,
    prototypes: torch.Tensor,
    *,
    noise_multiplier: float,
    sample_rate: float,
    generator: torch.Generator | None,
    groups: torch.Tensor | None = None,
    max_per_group: int = 1,
) -> PrototypeRelease:
    """Noisy per-prototype sums and counts of the Poisson-sampled records.

    embeddings: (N, d), or ``LazyRecords`` to embed only the sampled records; prototypes: (P, d),
    public (last round's global prototypes). Accounted as (noise_multiplier, sample_rate),
    add/remove adjacency (see module docstring).
    """
    lazy = isinstance(embeddings, LazyRecords)
    if lazy:
        _check_mechanism(noise_multiplier, sample_rate)  # before any record is encoded
    else:
        embeddings = _validated(embeddings, noise_multiplier, sample_rate)
    _check_prototypes(prototypes, embeddings.dim if lazy else embeddings.shape[1])  # before any encode
    idx = _sample(embeddings.n if lazy else embeddings.shape[0], sample_rate=sample_rate,
                  generator=generator, groups=groups, max_per_group=max_per_group)  # (B,) taking part
    if lazy:
        x = _validated(embeddings.embed(idx), noise_multiplier, sample_rate)  # (B, d)
        if x.shape != (idx.shape[0], embeddings.dim):
            raise ValueError(f"embed returned shape {tuple(x.shape)} for {idx.shape[0]} sampled records "
                             f"of dim {embeddings.dim}")
    else:
        x = embeddings[idx]  # (B, d)
    protos = F.normalize(prototypes.detach().to("cpu", torch.float32), dim=1)  # (P, d)
    p, d = protos.shape
    weight = 1.0 / max_per_group  # a group's records move sums and counts by <= 1 each
    rows = clip_rows(x, max_norm=1.0) * weight  # (B, d)
    nearest = (rows @ protos.T).argmax(dim=1) if rows.shape[0] else torch.zeros(0, dtype=torch.long)  # (B,)
    sums = torch.zeros(p, d).index_add_(0, nearest, rows)  # (P, d)
    counts = torch.zeros(p).index_add_(0, nearest, torch.full((rows.shape[0],), weight))  # (P,)
    std = noise_multiplier * PROTOTYPE_SENSITIVITY
    sums = sums + std * torch.randn(p, d, generator=generator)
    counts = counts + std * torch.randn(p, generator=generator)
    return PrototypeRelease(sums=sums, counts=counts)


def merge_prototypes(
    releases: Sequence[PrototypeRelease], *, previous: torch.Tensor, min_count: float
) -> torch.Tensor:
    """Server side: new unit-norm prototypes (P, d) from the sites' noisy sums.

    Prototype p becomes the direction of the summed sums where the summed noisy count is at
    least ``min_count`` (and the sum is non-zero); elsewhere it keeps ``previous[p]``.
    Post-processing of DP releases: costs no ε.
    """
    if previous.dim() != 2:
        raise ValueError(f"previous prototypes must be (P, d), got shape {tuple(previous.shape)}")
    prev = previous.detach().to("cpu", torch.float32)
    total_sums = torch.zeros_like(prev)  # (P, d)
    total_counts = torch.zeros(prev.shape[0])  # (P,)
    for i, r in enumerate(releases):
        if tuple(r.sums.shape) != tuple(prev.shape) or tuple(r.counts.shape) != (prev.shape[0],):
            raise ValueError(
                f"release {i} has sums {tuple(r.sums.shape)} and counts {tuple(r.counts.shape)}; "
                f"expected {tuple(prev.shape)} and ({prev.shape[0]},)"
            )
        if not (torch.isfinite(r.sums).all() and torch.isfinite(r.counts).all()):
            raise ValueError(f"release {i} contains NaN or Inf")
        total_sums += r.sums.float().cpu()
        total_counts += r.counts.float().cpu()
    norms = total_sums.norm(dim=1)  # (P,)
    update = (total_counts >= min_count) & (norms > 0)
    out = F.normalize(prev, dim=1)
    out[update] = total_sums[update] / norms[update, None]
    return out


PROTOTYPE_SEED = 1234  # public: the same random prototypes at every site


def init_prototypes(*, num: int, dim: int, seed: int) -> torch.Tensor:
    """Public random unit-norm prototypes (num, dim): no data involved."""
    if num < 1 or dim < 1:
        raise ValueError(f"num and dim must be >= 1, got num={num}, dim={dim}")
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num, dim, generator=g), dim=1)
