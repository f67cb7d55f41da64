"""InfoNCE with external (queue) negatives.

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
    row_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits with the positive in column 0.

    query, positive: (B, d), unit norm; negatives: (K, d) or None (K may be 0).
    in_batch: the other rows' positives are negatives too (B - 1 more columns); this couples
    examples and so is not allowed under per-example DP.
    row_negatives: (B, S, d) negatives of each row alone (``mix_hard_negatives``), or None.
    Returns (B, 1 + K [+ B - 1] [+ S]).
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
    if row_negatives is not None and row_negatives.shape[1] > 0:
        if row_negatives.shape[0] != query.shape[0] or row_negatives.shape[2] != query.shape[1]:
            raise ValueError(f"row_negatives {tuple(row_negatives.shape)} do not fit queries {tuple(query.shape)}")
        cols.append(torch.einsum("bd,bsd->bs", query, row_negatives.to(query.dtype)))  # (B, S)
    return torch.cat(cols, dim=1) / temperature


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: float,
    in_batch: bool = False,
    row_negatives: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean (or per-example with reduction='none') InfoNCE loss.

    An empty batch gives a zero loss that still has a graph (Poisson sampling makes empty
    batches). With no negatives at all the loss is 0 (log 1): nothing to contrast against.
    """
    logits = info_nce_logits(query, positive, negatives, temperature=temperature, in_batch=in_batch,
                             row_negatives=row_negatives)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    per_example = F.cross_entropy(logits, target, reduction="none")  # (B,)
    if reduction == "none":
        return per_example
    if per_example.numel() == 0:
        return query.sum() * 0.0
    if reduction == "sum":
        return per_example.sum()
    return per_example.mean()


@torch.no_grad()
def mix_hard_negatives(
    query: torch.Tensor, negatives: torch.Tensor, *, num_mix: int, pool: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Synthetic hard negatives for each query, after MoCHi (Kalantidis et al. 2020).

    For each query, from its ``pool`` most similar negatives: num_mix // 2 mixes of two of them
    (a n_i + (1 - a) n_j, a ~ U(0, 1)) and num_mix - num_mix // 2 mixes of one with the query
    itself (b q + (1 - b) n_j, b ~ U(0, 0.5), so the negative stays closer to n_j), each renormalized.
    query: (B, d), negatives: (K, d), both unit norm. Returns detached (B, S, d), S = num_mix, or
    (B, 0, d) when there are no negatives. Each row is made from its own query and the shared
    negatives only, so per-example gradients stay per example.
    """
    b, d = query.shape
    k = negatives.shape[0] if negatives is not None else 0
    if num_mix <= 0 or k == 0 or b == 0:
        return query.new_zeros(b, 0, d)
    q = query.detach()
    negs = negatives.to(q.dtype)
    top = (q @ negs.T).topk(min(pool, k), dim=1).indices  # (B, P) hardest first
    hard = negs[top]  # (B, P, d)
    p = hard.shape[1]
    n_pair, n_query = num_mix // 2, num_mix - num_mix // 2

    def pick(n: int) -> torch.Tensor:  # (B, n, d) random members of each row's pool
        idx = torch.randint(p, (b, n), generator=generator).to(q.device)
        return hard.gather(1, idx.unsqueeze(-1).expand(b, n, d))

    a = torch.rand(b, n_pair, 1, generator=generator).to(q.device, q.dtype)
    pairs = a * pick(n_pair) + (1 - a) * pick(n_pair)  # (B, n_pair, d)
    beta = 0.5 * torch.rand(b, n_query, 1, generator=generator).to(q.device, q.dtype)
    with_query = beta * q.unsqueeze(1) + (1 - beta) * pick(n_query)  # (B, n_query, d)
    return F.normalize(torch.cat([pairs, with_query], dim=1), dim=2)


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


def relation_kl(
    query: torch.Tensor, target: torch.Tensor, anchors: torch.Tensor, *, temperature: float,
) -> torch.Tensor:
    """KL(p_target || p_query), each row's softmax similarity profile over a set of anchors.

    query: (B, d) the trained model's embeddings; target: (B, d) detached embeddings whose
    relations to the anchors are to be kept; anchors: (K, d). Relational distillation as in FedX
    (Han et al. 2022), here with other sites' queue entries as the anchors. Zero (with a graph)
    when the batch or the anchor set is empty.
    """
    if query.shape[0] == 0 or anchors.shape[0] == 0:
        return query.sum() * 0.0
    log_q = F.log_softmax(query @ anchors.T / temperature, dim=1)  # (B, K)
    log_p = F.log_softmax(target @ anchors.T / temperature, dim=1)  # (B, K)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
