"""InfoNCE with external (queue) negatives, and SimCLR's NT-Xent.

Oord et al. 2018 (CPC) and He et al. 2020 (MoCo): for a query q_i with positive key k_i and
negatives n_1..n_K, loss_i = -log( exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_j exp(q_i.n_j / t)) ).
The logits are built by a pure function so each term can be tested on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce_logits(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: float,
    in_batch: bool = False,
) -> torch.Tensor:
    """Logits with the positive in column 0.

    query, positive: (B, d), unit norm; negatives: (K, d) or None (K may be 0).
    in_batch: the other rows' positives are negatives too (B - 1 more columns); this couples
    examples and so is not allowed under per-example DP.
    Returns (B, 1 + K [+ B - 1]).
    """
    if query.shape != positive.shape:
        raise ValueError(f"query {tuple(query.shape)} and positive {tuple(positive.shape)} differ")
    pos = (query * positive).sum(dim=1, keepdim=True)  # (B, 1)
    cols = [pos]
    if negatives is not None and negatives.shape[0] > 0:
        if negatives.shape[1] != query.shape[1]:
            raise ValueError(f"negatives have dim {negatives.shape[1]}, queries {query.shape[1]}")
        cols.append(query @ negatives.to(query.dtype).T)  # (B, K)
    if in_batch and query.shape[0] > 1:
        b = query.shape[0]
        sim = query @ positive.T  # (B, B); diagonal is the positive, already in column 0
        off_diag = ~torch.eye(b, dtype=torch.bool, device=query.device)
        cols.append(sim[off_diag].view(b, b - 1))  # (B, B-1)
    return torch.cat(cols, dim=1) / temperature


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: float,
    in_batch: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean (or per-example with reduction='none') InfoNCE loss.

    An empty batch gives a zero loss that still has a graph (Poisson sampling makes empty
    batches). With no negatives at all the loss is 0 (log 1): nothing to contrast against.
    """
    logits = info_nce_logits(query, positive, negatives, temperature=temperature,
                             in_batch=in_batch)  # (B, 1 + ...)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    per_example = F.cross_entropy(logits, target, reduction="none")  # (B,)
    if reduction == "none":
        return per_example
    if per_example.numel() == 0:
        return query.sum() * 0.0
    if reduction == "sum":
        return per_example.sum()
    return per_example.mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """SimCLR's symmetric loss: each of the 2B views against the other 2B - 2 as negatives."""
    b = z1.shape[0]
    if b == 0:
        return z1.sum() * 0.0
    z = torch.cat([z1, z2], dim=0)  # (2B, d)
    sim = z @ z.T / temperature  # (2B, 2B)
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)

