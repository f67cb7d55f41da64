"""Poisson sampling of examples or of whole groups (patients) for DP-SGD and DP releases.

Poisson sampling (each unit independently with probability q) is what the subsampled Gaussian
mechanism's accounting assumes (Mironov et al. 2019): batch sizes vary, and may be 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def poisson_sample(*, num_examples: int, sample_rate: float,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Indices (int64, sorted) of examples included independently with prob ``sample_rate``;
    may be empty."""
    mask = torch.rand(num_examples, generator=generator) < sample_rate  # (N,)
    return mask.nonzero(as_tuple=True)[0]


def group_poisson_sample(*, groups: torch.Tensor, sample_rate: float, generator: torch.Generator | None,
                         max_per_group: int | None = None) -> torch.Tensor:
    """Indices (int64, sorted) of the examples of Poisson-sampled groups (patients).

    groups: (N,) int64 group id of each example. Each distinct group is included independently
    with prob ``sample_rate``, with all its examples; with ``max_per_group`` a group with more
    examples contributes a random subset of that size (embedding releases cap groups this
    way; DP-SGD takes every image). May be empty.
    """
    groups = groups.reshape(-1)
    if groups.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    ids, inverse = torch.unique(groups, return_inverse=True)  # ids: (G,), inverse: (N,)
    chosen = torch.rand(ids.numel(), generator=generator) < sample_rate  # (G,)
    if max_per_group is None:
        return chosen[inverse].nonzero(as_tuple=True)[0]
    keys = torch.rand(groups.numel(), generator=generator)  # random order inside each group
    candidates = chosen[inverse].nonzero(as_tuple=True)[0]
    if candidates.numel() == 0:
        return candidates
    # sort candidates by (group, random key) and keep the first max_per_group of each group
    grp = inverse[candidates]
    order = torch.argsort(keys[candidates])
    order = order[torch.argsort(grp[order], stable=True)]
    grp_sorted = grp[order]
    starts = torch.ones_like(grp_sorted, dtype=torch.bool)
    starts[1:] = grp_sorted[1:] != grp_sorted[:-1]
    pos = torch.arange(grp_sorted.numel())
    first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=0).values
    rank = pos - first  # rank of each candidate inside its group
    keep = candidates[order[rank < max_per_group]]
    return torch.sort(keep).values


def dp_training_batches(
    *,
    num_examples: int,
    sample_rate: float,
    epochs: float | None = None,
    steps: int | None = None,
    generator: torch.Generator | None,
    groups: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Poisson batches for DP-SGD: ``steps`` of them, or ``round(epochs / sample_rate)``.

    With ``groups`` (N,) the unit sampled is the patient, with all its examples.
    Yields int64 index tensors (B,), B varying and possibly 0.
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")
    total = int(steps) if steps is not None else max(1, round(epochs / sample_rate))
    if groups is not None and groups.numel() != num_examples:
        raise ValueError(f"groups has {groups.numel()} entries for {num_examples} examples")
    for _ in range(total):
        if groups is None:
            yield poisson_sample(num_examples=num_examples, sample_rate=sample_rate, generator=generator)
        else:
            yield group_poisson_sample(groups=groups, sample_rate=sample_rate, generator=generator)
